"""Grouped-query self-attention layer with an optional KV cache.

Nemotron-H attention: q/k/v/o projections without bias, no positional
encoding (RoPE only when `rope_theta` is set), softmax scale head_dim**-0.5.

Keys and values are projected for the whole sequence (the cache holds them);
queries, the attention and the output projection run in blocks of
`seq_block` queries when the sequence is longer.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from hybridvlm.cache import KVCache, Layout
from hybridvlm.config import LMConfig
from hybridvlm.context.ring_attention import ring_attention
from hybridvlm.layers.init import normal_param
from hybridvlm.layers.rope import apply_rope
from hybridvlm.ops.attention import attention
from hybridvlm.ops.attention_library import PROMPT_KERNELS, prompt_attention
from hybridvlm.ops.blocks import map_blocks
from hybridvlm.ops.dense import dense


class Attention(nnx.Module):
    def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q = normal_param(rngs, (d, n, h), ("embed", "q_heads", "head_dim"), dtype)
        self.k = normal_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = normal_param(rngs, (d, kv, h), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = normal_param(rngs, (n, h, d), ("q_heads", "head_dim", "embed"), dtype)

    def project_q(self, x, rope_pos):
        """Queries (b, t, n, h) of x's tokens (RoPE at rope_pos (b, t) if configured)."""
        q = dense("btd,dnh->btnh", x, self.q[...])
        return q if self.cfg.rope_theta is None else apply_rope(q, rope_pos, self.cfg.rope_theta)

    def project_k(self, x, rope_pos):
        """Keys (b, t, kv, h) of x's tokens (RoPE at rope_pos if configured)."""
        k = dense("btd,dkh->btkh", x, self.k[...])
        return k if self.cfg.rope_theta is None else apply_rope(k, rope_pos, self.cfg.rope_theta)

    def project_qk(self, x, layout: Layout):
        """Queries (b, t, n, h) and keys (b, t, kv, h) of x's tokens (RoPE applied if configured)."""
        return self.project_q(x, layout.rope_pos), self.project_k(x, layout.rope_pos)

    def __call__(self, x, layout: Layout, cache: KVCache | None = None):
        """Attends x's tokens to themselves, or to the cache plus themselves.

        Args:
          x: (b, t, d) normed hidden states.
          layout: positions and validity of x's tokens.
          cache: None (no cache), or this layer's KVCache: x's keys and
            values are appended to it. With `layout.decode`, x attends to
            every valid cache slot; otherwise only to x itself (prefill).
        Returns:
          y (b, t, d) and the updated cache (or None).
        """
        cfg = self.cfg
        k = self.project_k(x, layout.rope_pos)
        v = dense("btd,dkh->btkh", x, self.v[...])
        if not layout.decode:
            keys = (k, v, layout.index, layout.valid)
            q_pos = layout.index
            if cache is not None:
                cache = cache.write(k, v, layout.valid)
        else:
            # Slots are in sequence order: x's slots follow every cached one.
            b, t = layout.valid.shape
            q_pos = jnp.broadcast_to(cache.length + jnp.arange(t, dtype=jnp.int32), (b, t))
            cache = cache.write(k, v, layout.valid)
            slots = jnp.broadcast_to(jnp.arange(cache.size, dtype=jnp.int32), cache.valid.shape)
            keys = (cache.k, cache.v, slots, cache.valid)

        scale = cfg.head_dim ** -0.5
        if layout.sequence_axis is not None and not layout.decode:
            # One shard of a prompt split along a mesh axis: keys and values go round the ring.
            axis, size = layout.sequence_axis
            out = ring_attention(self.project_q(x, layout.rope_pos), k, v, q_pos=layout.index, k_pos=layout.index,
                                 k_valid=layout.valid, scale=scale, axis_name=axis, axis_size=size,
                                 block_q=cfg.attention_block_q, block_k=cfg.attention_block_k)
            return dense("btnh,nhd->btd", out, self.o[...]), cache
        if not layout.decode and cfg.attention_impl in PROMPT_KERNELS:
            # A prompt's tokens are in position order, which the library kernels'
            # causal masks need; they bound memory themselves, so no query blocks.
            out = prompt_attention(self.project_q(x, layout.rope_pos), k, v, valid=layout.valid, scale=scale,
                                   impl=cfg.attention_impl)
            return dense("btnh,nhd->btd", out, self.o[...]), cache
        impl = "auto" if cfg.attention_impl in PROMPT_KERNELS else cfg.attention_impl

        def attend(_, xb, q_pos_b, rope_b):
            """One block of queries: (b, i, d) -> (b, i, d)."""
            k_, v_, k_pos, k_valid = keys
            out = attention(self.project_q(xb, rope_b), k_, v_, q_pos=q_pos_b, k_pos=k_pos, k_valid=k_valid,
                            scale=scale, impl=impl, block_q=cfg.attention_block_q, block_k=cfg.attention_block_k)
            return None, dense("btnh,nhd->btd", out, self.o[...])

        y, _ = map_blocks(attend, x, q_pos, layout.rope_pos, block=cfg.seq_block)
        return y, cache
