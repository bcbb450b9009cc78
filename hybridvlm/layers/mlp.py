"""Nemotron-H MLP: up projection, squared ReLU, down projection (no gate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hybridvlm.config import SEQ_BLOCK
from hybridvlm.layers.init import normal_param, zeros_param
from hybridvlm.ops.blocks import map_blocks
from hybridvlm.ops.dense import dense


class MLP(nnx.Module):
    """seq_block: tokens per block of a long sequence (0: never blocked); the
    (t, hidden) activations are the largest temporaries of a long prefill."""

    def __init__(self, dim: int, hidden: int, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32,
                 seq_block: int = SEQ_BLOCK):
        self.up = normal_param(rngs, (dim, hidden), ("embed", "mlp"), dtype)
        self.down = normal_param(rngs, (hidden, dim), ("mlp", "embed"), dtype)
        self.up_bias = zeros_param((hidden,), ("mlp",), dtype) if bias else None
        self.down_bias = zeros_param((dim,), ("embed",), dtype) if bias else None
        self.seq_block = seq_block

    def __call__(self, x):
        """x: (b, t, d) -> (b, t, d), in blocks of `seq_block` tokens when t is longer."""
        y, _ = map_blocks(lambda _, xb: (None, self._apply(xb)), x, block=self.seq_block)
        return y

    def _apply(self, x):
        """(b, t, d) -> (b, t, d) for one block of tokens."""
        h = dense("btd,df->btf", x, self.up[...])
        if self.up_bias is not None:
            h = h + self.up_bias[...]
        h = jnp.square(jax.nn.relu(h))
        y = dense("btf,fd->btd", h, self.down[...])
        if self.down_bias is not None:
            y = y + self.down_bias[...]
        return y
