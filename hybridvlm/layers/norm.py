"""RMSNorm and the Mamba-2 group-wise gated RMSNorm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from hybridvlm.layers.init import param


def _rms(x, eps):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """y = w * x / rms(x), computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), dtype), ("embed",))

    def __call__(self, x):
        """x: (..., dim) -> (..., dim)."""
        y = self.weight[...].astype(jnp.float32) * _rms(x.astype(jnp.float32), self.eps)
        return y.astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Mamba-2 output norm: RMSNorm over each of `groups` slices of x * silu(z)."""

    def __init__(self, dim: int, *, groups: int, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.groups = groups
        self.weight = param(jnp.ones((dim,), dtype), ("mamba_inner",))

    def __call__(self, x, z):
        """x, z: (..., dim) -> (..., dim) in x's dtype."""
        h = x.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        h = rearrange(h, "... (g e) -> ... g e", g=self.groups)
        h = rearrange(_rms(h, self.eps), "... g e -> ... (g e)")
        w = self.weight[...]
        return (w * h.astype(x.dtype)).astype(x.dtype)
