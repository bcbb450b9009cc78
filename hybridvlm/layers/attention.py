"""Grouped-query self-attention layer with an optional KV cache.

Nemotron-H attention: q/k/v/o projections without bias, no positional
encoding (RoPE only when `rope_theta` is set), softmax scale head_dim**-0.5.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hybridvlm.cache import KVCache, Layout
from hybridvlm.config import LMConfig
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.rope import apply_rope
from hybridvlm.ops.attention import attention


class Attention(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q = normal_param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.k = normal_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = normal_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = normal_param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)

    def __call__(self, x, layout: Layout, cache: KVCache | None = None):
        """Attends x's tokens to themselves, or to the cache plus themselves.

        Args:
          x: (b, t, d) normed hidden states.
          layout: positions and validity of x's tokens.
          cache: None (no cache), or a KVCache whose slots
            [layout.start, layout.start + t) receive x's keys and values.
            With `layout.kv_valid` set, x attends to every valid cache slot
            (decoding); otherwise only to x itself (prefill).
        Returns:
          y (b, t, d) and the updated cache (or None).
        """
        cfg = self.cfg
        q = jnp.einsum("btd,dnh->btnh", x, self.q[...])
        k = jnp.einsum("btd,dkh->btkh", x, self.k[...])
        v = jnp.einsum("btd,dkh->btkh", x, self.v[...])
        if cfg.rope_theta is not None:
            q = apply_rope(q, layout.rope_pos, cfg.rope_theta)
            k = apply_rope(k, layout.rope_pos, cfg.rope_theta)
        attend = lambda k_, v_, k_pos, k_valid: attention(
            q, k_, v_, q_pos=layout.index, k_pos=k_pos, k_valid=k_valid,
            scale=cfg.head_dim ** -0.5, impl=cfg.attention_impl,
            block_q=cfg.attention_block_q, block_k=cfg.attention_block_k,
        )
        if cache is not None:
            cache = cache.write(k, v, layout.start)
        if layout.kv_valid is None:
            out = attend(k, v, layout.index, layout.valid)
        else:
            slots = jnp.arange(layout.kv_valid.shape[1], dtype=jnp.int32)
            k_pos = jnp.broadcast_to(slots, layout.kv_valid.shape)
            out = attend(cache.k, cache.v, k_pos, layout.kv_valid)
        return jnp.einsum("btnh,nhd->btd", out, self.o[...]), cache
