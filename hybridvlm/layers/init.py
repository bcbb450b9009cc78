"""Parameter constructors that attach logical sharding axes.

Logical axis names (`embed`, `mlp`, `heads`, ...) are mapped to mesh axes by
the rule table in `train/` when the model is sharded; here they are metadata.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def normal_param(rngs: nnx.Rngs, shape, axes, dtype, std: float = INIT_STD) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def zeros_param(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=tuple(axes))


def const_param(value, axes, dtype) -> nnx.Param:
    return nnx.Param(jnp.asarray(value, dtype), logical_axes=tuple(axes))
