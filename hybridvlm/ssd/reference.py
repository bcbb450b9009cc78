"""Sequential Mamba-2 SSD: the recurrence written out one step at a time.

Per head h with scalar A_h < 0 and B/C group g(h):

    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T        (S: head_dim x d_state)
    y_t = S_t C_t

This is the ground truth the chunked and Pallas paths are tested against,
and `ssd_step` is the one-token decode update. The D skip is not included:
the mixer adds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange


def ssd_step(state, x, dt, A, B, C):
    """One recurrence step.

    Args:
      state: (b, h, p, n) float32 SSM state.
      x: (b, h, p) input; dt: (b, h) positive step; A: (h,) negative decay rate.
      B, C: (b, g, n) input / output projections for the g groups.
    Returns:
      y (b, h, p) float32 and the new state (b, h, p, n) float32.
    """
    g = B.shape[-2]
    x = x.astype(jnp.float32)
    dt = dt.astype(jnp.float32)
    decay = jnp.exp(dt * A.astype(jnp.float32))  # (b, h)
    s = rearrange(state, "b (g r) p n -> b g r p n", g=g)
    xg = rearrange(x * dt[..., None], "b (g r) p -> b g r p", g=g)
    decay_g = rearrange(decay, "b (g r) -> b g r", g=g)
    s = s * decay_g[..., None, None] + jnp.einsum("bgrp,bgn->bgrpn", xg, B.astype(jnp.float32))
    y = jnp.einsum("bgrpn,bgn->bgrp", s, C.astype(jnp.float32))
    return rearrange(y, "b g r p -> b (g r) p"), rearrange(s, "b g r p n -> b (g r) p n")


def ssd_sequential(x, dt, A, B, C, *, initial_state=None):
    """Runs `ssd_step` over time with `lax.scan`.

    Args:
      x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n).
      initial_state: (b, h, p, n) or None for zeros.
    Returns:
      y (b, l, h, p) float32 and final state (b, h, p, n) float32.
    """
    b, _, h, p = x.shape
    n = B.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((b, h, p, n), jnp.float32)

    def step(state, inputs):
        xt, dtt, Bt, Ct = inputs
        y, state = ssd_step(state, xt, dtt, A, Bt, Ct)
        return state, y

    time_major = [jnp.moveaxis(v, 1, 0) for v in (x, dt, B, C)]
    final, ys = jax.lax.scan(step, initial_state.astype(jnp.float32), time_major)
    return jnp.moveaxis(ys, 0, 1), final
