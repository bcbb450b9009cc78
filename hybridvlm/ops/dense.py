"""Projections by weight matrices, accumulated in float32."""

from __future__ import annotations

import jax.numpy as jnp


def dense(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` accumulated in float32, returned in their result dtype.

    The values are a plain einsum's (one rounding from a float32
    accumulator). Asking for float32 explicitly matters to XLA's CPU compiler:
    given a plain bfloat16 einsum it converts both operands to float32, i.e. a
    float32 copy of every weight, which it may schedule at the start of the
    program for all layers at once (2x the bfloat16 parameters); given this
    one, it multiplies the bfloat16 operands directly.
    """
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))
