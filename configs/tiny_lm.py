"""Tiny randomly initialised Nemotron-H style LM: the embedded demo default.

All three layer kinds, GQA attention, Mamba-2 with 2 B/C groups. Untrained:
it exercises the full code path (prefill, cache, decoding) in seconds on a
laptop CPU, and its output is noise.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(
        vocab_size=262,  # hybridvlm.tokenizer.byte_tokenizer()
        hidden_size=128,
        pattern="M-M*-M*-",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        mamba_num_heads=8,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=2,
        conv_kernel=4,
        chunk_size=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=(2,),
    )
    c.prompt = "Frame 1 sampled at 0.0 seconds: a red ball rolls left. Question: where does the ball go?"
    c.max_new_tokens = 24
    c.temperature = 0.0
    c.top_p = 1.0
    return c
