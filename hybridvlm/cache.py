"""Decoding state: per-layer caches and the token layout of a forward pass.

All shapes are static: the KV cache is preallocated to the full length
(prompt + new tokens) and written with `dynamic_update_slice`, so a decode
step compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of one attention layer: (b, s, kv_heads, head_dim) each."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch, size, kv_heads, head_dim, dtype):
        z = jnp.zeros((batch, size, kv_heads, head_dim), dtype)
        return cls(k=z, v=z)

    def write(self, k, v, start) -> "KVCache":
        """Stores (b, t, kv, d) keys/values at slots [start, start + t)."""
        at = (0, start, 0, 0)
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at),
        )


@struct.dataclass
class MambaState:
    """Recurrent state of one Mamba-2 layer.

    conv: (b, conv_kernel - 1, conv_dim) last pre-conv inputs (x, B, C).
    ssm: (b, heads, head_dim, d_state) float32 SSM state.
    """

    conv: jax.Array
    ssm: jax.Array


@struct.dataclass
class Cache:
    """Everything decoding needs after a prefill.

    layers: one entry per LM layer: KVCache (attention), MambaState (Mamba)
      or None (MLP).
    valid: (b, s) bool, slots that hold real (non-padding) tokens.
    length: () int32, number of slots written so far.
    next_rope_pos: (b,) int32, RoPE position of each row's next token.
    """

    layers: tuple
    valid: jax.Array
    length: jax.Array
    next_rope_pos: jax.Array

    @property
    def size(self) -> int:
        return self.valid.shape[1]


@struct.dataclass
class Layout:
    """Where the tokens of one forward pass sit.

    index: (b, t) int32 slot of each token in the full sequence (causality).
    valid: (b, t) bool, False on padding.
    rope_pos: (b, t) int32 position for RoPE (padding does not count).
    start: () int32 first slot of this pass.
    kv_valid: None to attend among these tokens only (no cache, or prefill);
      else (b, s) validity of all cache slots after this pass is written.
    """

    index: jax.Array
    valid: jax.Array
    rope_pos: jax.Array
    start: jax.Array
    kv_valid: jax.Array | None = None

    @classmethod
    def prompt(cls, attention_mask) -> "Layout":
        """Layout of a (left-padded) prompt: attention_mask (b, t) of 0/1 or bool."""
        valid = attention_mask.astype(bool)
        b, t = valid.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope_pos = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        return cls(index=index, valid=valid, rope_pos=rope_pos, start=jnp.int32(0))

