"""Mid-size Nemotron-H style hybrid LM: the default of eval/bench_prefill.py.

Randomly initialised (the benchmark measures time, not quality). 17 layers in
a Nemotron-H-like pattern (7 Mamba-2, 7 MLP, 3 attention), hidden 384,
Mamba-2 12 heads x 64 (= 2x hidden), d_state 64, 2 B/C groups, chunk 128,
GQA attention 6 x 64 with 2 KV heads, MLP 1152 (3x hidden, squared ReLU),
vocab 1024. Sized for a 2-core CPU: a full prefill of the 8192-visual-token
video prompt (8240 tokens) takes ~8-10 s there (at hidden 512 / 21 layers it
took 16.5 s, 9 s of it in the three 8k-token attention layers: blockwise
attention runs at ~23 GFLOP/s on that CPU, the naive path is 4x slower), and
each benchmark point (AOT compile + warm-up + repeats) well under a minute.

`bench` holds the prompt layout the benchmark builds: `prefix` text tokens,
`num_visual` visual tokens, `question` text tokens at the end.
"""

import ml_collections

PATTERN = "M-M*-M-M*-M-M-M*-"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        vocab_size=1024,
        hidden_size=384,
        pattern=PATTERN,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=1152,
        mamba_num_heads=12,
        mamba_head_dim=64,
        ssm_state_size=64,
        n_groups=2,
        conv_kernel=4,
        chunk_size=128,
        time_step_limit=(0.001, float("inf")),
        layer_norm_epsilon=1e-5,
    )
    c.bench = dict(prefix=16, num_visual=8192, question=32)
    return c
