"""The language model of Nemotron-Nano-12B-v2-VL (the paper's base model).

62 layers: 28 Mamba-2, 28 MLP, 6 attention (at 7, 16, 25, 34, 43, 52),
hidden 5120, 40 query / 8 KV heads of 128, MLP 20480 (squared ReLU),
Mamba-2 128 heads x 80, d_state 128, 8 groups, conv 4, chunk 128,
vocab 131072. Real weights come from the HF checkpoint's config.json; this
file is for shape checks and ahead-of-time compilation without the weights
(`python -m eval.bench_memory` compiles its long-video prefill).

Memory of long prefills (`seq_block`, `ssd_chunk_group`: the LMConfig
defaults, spelled out): a 32k-token prefill runs every layer in 3 blocks of
~11k tokens and the SSD in groups of 32 chunks (4096 tokens), so its
temporaries are one block's and do not grow with depth.
"""

import ml_collections

PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.model = dict(
        vocab_size=131072,
        hidden_size=5120,
        pattern=PATTERN,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=20480,
        mamba_num_heads=128,
        mamba_head_dim=80,
        ssm_state_size=128,
        n_groups=8,
        conv_kernel=4,
        chunk_size=128,
        seq_block=16384,
        ssd_chunk_group=32,
        time_step_limit=(0.001, float("inf")),
        layer_norm_epsilon=1e-5,
    )
    return c
