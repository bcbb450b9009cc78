"""Parameter constructors that attach logical sharding axes.

Logical axis names (`embed`, `mlp`, `q_heads`, ...) are mapped to mesh axes
by the rule table in `hybridvlm/sharding.py` when the model is sharded; here they
are metadata, one name (or None) per dimension.

They are stored as Flax's `out_sharding` metadata, so `nnx.get_partition_spec`
reports them (e.g. P('vocab', 'embed')) and `nnx.Optimizer` copies them to its
state. `eager_sharding=False` keeps construction mesh-agnostic: Flax would
otherwise shard each value at creation and demand a mesh (plus rules for
logical names); placement is done once, from the rule table, by `train/`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

INIT_STD = 0.02


def param(value, axes) -> nnx.Param:
    """value: an array of rank len(axes); axes: a logical name or None per dimension."""
    axes = tuple(axes)
    if len(axes) != jnp.ndim(value):
        raise ValueError(f"logical axes {axes} do not match a parameter of shape {jnp.shape(value)}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def normal_param(rngs: nnx.Rngs, shape, axes, dtype, std: float = INIT_STD) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return param(value.astype(dtype), axes)


def zeros_param(shape, axes, dtype) -> nnx.Param:
    return param(jnp.zeros(shape, dtype), axes)


def const_param(value, axes, dtype) -> nnx.Param:
    return param(jnp.asarray(value, dtype), axes)
