"""Nemotron-H MLP: up projection, squared ReLU, down projection (no gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvlm.layers.init import normal_param, zeros_param


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        self.up = normal_param(rngs, (dim, hidden), ("embed", "mlp"), dtype)
        self.down = normal_param(rngs, (hidden, dim), ("mlp", "embed"), dtype)
        self.up_bias = zeros_param((hidden,), ("mlp",), dtype) if bias else None
        self.down_bias = zeros_param((dim,), ("embed",), dtype) if bias else None

    def __call__(self, x):
        """x: (b, t, d) -> (b, t, d)."""
        h = jnp.einsum("btd,df->btf", x, self.up[...])
        if self.up_bias is not None:
            h = h + self.up_bias[...]
        h = jnp.square(jax.nn.relu(h))
        y = jnp.einsum("btf,fd->btd", h, self.down[...])
        if self.down_bias is not None:
            y = y + self.down_bias[...]
        return y
