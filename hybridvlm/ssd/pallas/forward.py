"""Pallas kernels of the SSD forward pass.

Per (batch b, head h, chunk c); s = position in chunk, a_cum = cumsum_s(dt A):

  kernel 1 y_diag = (C B^T * exp(a_cum_i - a_cum_j) * dt_j * [j <= i]) x
           U_c    = x^T (B * exp(a_last - a_cum) * dt)        (chunk's own end state)
  XLA      S_c = exp(a_last_c) S_{c-1} + U_c by associative scan (layout.chunk_states)
  kernel 2 y = y_diag + exp(a_cum) * (C S_{c-1}^T)             (incoming state)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybridvlm.ssd.pallas import layout as lay
from hybridvlm.ssd.pallas.layout import F32, dot


def causal_decay(acol, arow):
    """(s, 1), (1, s) cumulative log-decay -> (s, s) exp(a_i - a_j) for j <= i, else 0."""
    s = acol.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (s, s), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (s, s), 1)
    return jnp.exp(jnp.where(rows >= cols, acol - arow, -jnp.inf))


def _chunk_local_kernel(x_ref, b_ref, c_ref, acol_ref, arow_ref, dtrow_ref, wcol_ref, y_ref, u_ref, *, precision):
    """One (batch, head, chunk): intra-chunk output and the chunk's end state.

    x (s, P); b, c (s, N); acol (s, 1) and arow (1, s): cumulative log-decay;
    dtrow (1, s); wcol (s, 1) = exp(a_last - a_cum) * dt, each step's weight
    in the chunk's end state. Writes y (s, P) and u (P, N). precision: see
    layout.PRECISIONS.
    """
    x = x_ref[...].astype(F32)
    Bm = b_ref[...].astype(F32)
    Cm = c_ref[...].astype(F32)
    cb = dot(Cm, Bm, ((1,), (1,)), precision)  # (s, s) = C B^T
    mixing = cb * causal_decay(acol_ref[...], arow_ref[...]) * dtrow_ref[...]
    y_ref[...] = dot(mixing, x, ((1,), (0,)), precision).astype(y_ref.dtype)
    u_ref[...] = dot(x, Bm * wcol_ref[...], ((0,), (0,)), precision).astype(u_ref.dtype)  # (P, N)


def _state_readout_kernel(y_ref, c_ref, acol_ref, s_ref, out_ref, *, precision):
    """One (batch, head, chunk): adds the incoming state's contribution.

    y (s, P) intra-chunk output; c (s, N); acol (s, 1); s (P, N) state entering.
    precision: see layout.PRECISIONS.
    """
    contrib = dot(c_ref[...].astype(F32), s_ref[...], ((1,), (1,)), precision)  # (s, P)
    out_ref[...] = (y_ref[...] + jnp.exp(acol_ref[...]) * contrib).astype(out_ref.dtype)


def ssd_forward(x, dt, A, B, C, initial_state, *, chunk_size, plan, interpret, precision):
    """Forward pass; shapes and options as in `hybridvlm.ssd.pallas.ssd_pallas`."""
    d = lay.dims_for(x.shape, B.shape, chunk_size, plan)
    o = lay.operands(x, dt, A, B, C, d)
    hb, gb = lay.head_block, lay.group_block(d)
    common = dict(plan=plan, interpret=interpret)

    y_diag, u = lay.call(
        functools.partial(_chunk_local_kernel, precision=precision), d,
        in_specs=[hb(d.cs, d.P), gb, gb, hb(d.cs, 1), hb(1, d.cs), hb(1, d.cs), hb(d.cs, 1)],
        out_specs=[hb(d.cs, d.P), hb(d.P, d.N)],
        out_shape=[jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.cs, d.P), F32),
                   jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.P, d.N), F32)],
        name="ssd_chunk_local", **common,
    )(o.x, o.B, o.C, lay.col(o.a_cum), lay.row(o.a_cum), lay.row(o.dt), lay.col(o.to_end))

    s_start, s_final = lay.chunk_states(jnp.exp(o.a_cum[..., -1]), u, lay.pad_state(initial_state, d))

    y = lay.call(
        functools.partial(_state_readout_kernel, precision=precision), d,
        in_specs=[hb(d.cs, d.P), gb, hb(d.cs, 1), hb(d.P, d.N)],
        out_specs=hb(d.cs, d.P),
        out_shape=jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.cs, d.P), F32),
        input_output_aliases={0: 0}, name="ssd_state_readout", **common,
    )(y_diag, o.C, lay.col(o.a_cum), s_start)
    return lay.chunks_to_heads(y, d), s_final[:, :, : d.p, : d.n]
