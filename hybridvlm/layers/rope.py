"""Rotary position embedding (rotate-half convention), off for Nemotron-H.

Nemotron-H attention has no positional encoding; hybrids that do use RoPE
set `LMConfig.rope_theta`.
"""

from __future__ import annotations

import jax.numpy as jnp


def apply_rope(x, positions, theta: float):
    """x: (b, t, n, d) with even d; positions: (b, t) int -> (b, t, n, d)."""
    d = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # (d/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, d/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)
