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
    """Keys and values of one attention layer.

    k, v: (b, s, kv_heads, head_dim); valid: (b, s) slots holding real
    tokens; length: () slots written. Each layer owns its slots: after a
    reduced prefill, a deeper layer holds fewer tokens than a shallow one.
    Slot order is sequence order, so slot indices give causality.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    length: jax.Array

    @classmethod
    def zeros(cls, batch, size, kv_heads, head_dim, dtype):
        z = jnp.zeros((batch, size, kv_heads, head_dim), dtype)
        return cls(k=z, v=z, valid=jnp.zeros((batch, size), bool), length=jnp.int32(0))

    @property
    def size(self) -> int:
        return self.k.shape[1]

    def write(self, k, v, valid) -> "KVCache":
        """Appends (b, t, kv, d) keys/values with validity (b, t) at slot `length`."""
        at = self.length
        return KVCache(
            k=jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), (0, at, 0, 0)),
            v=jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), (0, at, 0, 0)),
            valid=jax.lax.dynamic_update_slice(self.valid, valid, (0, at)),
            length=at + k.shape[1],
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
    length: () int32, tokens of the (unreduced) sequence so far.
    next_rope_pos: (b,) int32, RoPE position of each row's next token.
    """

    layers: tuple
    length: jax.Array
    next_rope_pos: jax.Array


@struct.dataclass
class Layout:
    """Where the tokens of one forward pass sit.

    index: (b, t) int32 position of each token in the full sequence; after
      pruning, the kept tokens keep their original positions (causality).
    valid: (b, t) bool, False on padding.
    rope_pos: (b, t) int32 position for RoPE (padding does not count).
    decode: static; True when these tokens follow a cache (attend to it),
      False for a prompt (attend among these tokens only).
    sequence_axis: static; None, or (mesh axis name, size) when this is one
      shard of a prompt split along that axis inside `jax.shard_map`
      (`hybridvlm.context`): index and rope_pos are then global, and the
      Mamba and attention layers exchange state and keys across shards.
    """

    index: jax.Array
    valid: jax.Array
    rope_pos: jax.Array
    decode: bool = struct.field(pytree_node=False, default=False)
    sequence_axis: tuple[str, int] | None = struct.field(pytree_node=False, default=None)

    @classmethod
    def prompt(cls, attention_mask) -> "Layout":
        """Layout of a (left-padded) prompt: attention_mask (b, t) of 0/1 or bool."""
        valid = attention_mask.astype(bool)
        b, t = valid.shape
        index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope_pos = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        return cls(index=index, valid=valid, rope_pos=rope_pos)

    def take(self, order) -> "Layout":
        """The tokens at `order` (b, t') of each row, in that order."""
        pick = lambda a: jnp.take_along_axis(a, order, axis=1)
        return Layout(index=pick(self.index), valid=pick(self.valid), rope_pos=pick(self.rope_pos),
                      decode=self.decode, sequence_axis=self.sequence_axis)
