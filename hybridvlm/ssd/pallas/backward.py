"""Pallas kernels of the SSD backward pass.

Forward, per (batch, head, chunk c), with a = a_cum (cumulative log-decay in
the chunk), a_last its last entry, L_ij = exp(a_i - a_j) [j <= i],
w_j = exp(a_last - a_j) dt_j and S_prev the state entering the chunk:

  y_i  = sum_j (C_i . B_j) L_ij dt_j x_j  +  exp(a_i) S_prev C_i
  S_c  = exp(a_last) S_prev + sum_j w_j x_j B_j^T

Backward, given dy and the final state's cotangent:

  kernel 1 U_c = x^T (B w)                    (recomputed chunk end states)
           V_c = (exp(a) dy)^T C              (readout cotangent of S_prev)
  XLA      S_prev by the forward scan; dS (cotangent of S_c) by the same
           associative scan run backwards (layout.state_cotangents)
  kernel 2 per chunk: dx, dB, dC, and the cotangents of a and dt
           at each position, as a column part and a row part (reducing the
           (s, s) mixing matrix over rows and over columns yields both; they
           are added in XLA rather than relaid out in the kernel)
  XLA      d(dt A) = reverse cumsum of da within the chunk;
           ddt += d(dt A) A, dA = sum d(dt A) dt.

dB, dC: on TPU (ordered grid) kernel 2 accumulates them over the heads of a
group in place; on GPU (parallel grid programs) it writes them per head and
XLA sums them, a transient h / g times the size of B and C (16x at Nemotron-H
12B dims).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange, reduce
from jax.experimental import pallas as pl

from hybridvlm.ssd.pallas import layout as lay
from hybridvlm.ssd.pallas.forward import causal_decay
from hybridvlm.ssd.pallas.layout import F32, dot


def _states_kernel(x_ref, b_ref, wcol_ref, dy_ref, c_ref, acol_ref, u_ref, v_ref, *, precision):
    """One (batch, head, chunk): chunk end state U (P, N) and readout cotangent V (P, N).

    x, dy (s, P); b, c (s, N); wcol (s, 1) end-state weights; acol (s, 1).
    precision: see layout.PRECISIONS.
    """
    Bw = b_ref[...].astype(F32) * wcol_ref[...]
    u_ref[...] = dot(x_ref[...].astype(F32), Bw, ((0,), (0,)), precision)
    dy_decayed = dy_ref[...] * jnp.exp(acol_ref[...])
    v_ref[...] = dot(dy_decayed, c_ref[...].astype(F32), ((0,), (0,)), precision)


def _total(v):
    """(s, t) -> (1, 1) sum, by two keepdims reductions (no scalars in the kernel)."""
    return jnp.sum(jnp.sum(v, axis=1, keepdims=True), axis=0, keepdims=True)


def _grad_kernel(x_ref, b_ref, c_ref, dy_ref, acol_ref, arow_ref, dtrow_ref, wcol_ref, s_ref, ds_ref,
                 dx_ref, db_ref, dc_ref, dacol_ref, darow_ref, ddtcol_ref, ddtrow_ref, *, accumulate, precision):
    """One (batch, head, chunk): cotangents of x, B, C, a_cum and dt.

    Inputs as in the forward kernels plus dy (s, P), s (P, N) the state
    entering the chunk and ds (P, N) the cotangent of the state leaving it.
    Writes dx (s, P), the a_cum and dt cotangents split as (s, 1) column and
    (1, s) row parts, and db, dc (s, N): this head's, or, with `accumulate`
    (grid (b, g, c, r), heads of a group on the last, ordered axis), summed
    into the group's block. precision: see layout.PRECISIONS.
    """
    s = x_ref.shape[0]
    x = x_ref[...].astype(F32)
    Bm = b_ref[...].astype(F32)
    Cm = c_ref[...].astype(F32)
    dy = dy_ref[...]
    acol, dtrow, wcol = acol_ref[...], dtrow_ref[...], wcol_ref[...]
    S, dS = s_ref[...], ds_ref[...]

    # Intra-chunk mixing M_ij = (C_i . B_j) L_ij dt_j.
    decay = causal_decay(acol, arow_ref[...])  # (s, s)
    mm = lambda a, b, contract: dot(a, b, contract, precision)
    cb_decay = mm(Cm, Bm, ((1,), (1,))) * decay
    mixing = cb_decay * dtrow
    d_mixing = mm(dy, x, ((1,), (1,)))  # (s, s) = dy x^T
    d_cb = d_mixing * decay * dtrow
    through_decay = d_mixing * mixing  # d(a_i - a_j) of each entry
    # Chunk end state: dU = dS; dw_j = x_j . (dS B_j).
    b_ds = mm(Bm, dS, ((1,), (1,)))  # (s, P)
    dw = jnp.sum(x * b_ds, axis=1, keepdims=True)  # (s, 1)
    # Incoming-state readout exp(a_i) S C_i.
    readout_decay = jnp.exp(acol)  # (s, 1)
    c_s = mm(Cm, S, ((1,), (1,)))  # (s, P)

    dx_ref[...] = mm(mixing, dy, ((0,), (0,))) + wcol * b_ds
    db = mm(d_cb, Cm, ((0,), (0,))) + wcol * mm(x, dS, ((1,), (0,)))
    dc = mm(d_cb, Bm, ((1,), (0,))) + readout_decay * mm(dy, S, ((1,), (0,)))
    if accumulate:
        @pl.when(pl.program_id(3) == 0)
        def _():
            db_ref[...] = jnp.zeros(db_ref.shape, db_ref.dtype)
            dc_ref[...] = jnp.zeros(dc_ref.shape, dc_ref.dtype)

        db_ref[...] += db
        dc_ref[...] += dc
    else:
        db_ref[...] = db
        dc_ref[...] = dc

    a_last = acol_ref[s - 1 : s, :]  # (1, 1)
    # a_last enters every w_j and the chunk decay exp(a_last) of S_prev.
    d_a_last = _total(dw * wcol) + jnp.exp(a_last) * _total(dS * S)
    is_last = jax.lax.broadcasted_iota(jnp.int32, (s, 1), 0) == s - 1
    dacol_ref[...] = (
        jnp.sum(through_decay, axis=1, keepdims=True)
        - dw * wcol
        + readout_decay * jnp.sum(dy * c_s, axis=1, keepdims=True)
        + jnp.where(is_last, d_a_last, 0.0)
    )
    darow_ref[...] = -jnp.sum(through_decay, axis=0, keepdims=True)
    ddtcol_ref[...] = dw * jnp.exp(a_last - acol)
    ddtrow_ref[...] = jnp.sum(d_mixing * cb_decay, axis=0, keepdims=True)


def ssd_backward(x, dt, A, B, C, initial_state, dy, d_final, *, chunk_size, plan, interpret, precision):
    """Cotangents of (x, dt, A, B, C, initial_state), each in its input's dtype.

    Args: the forward's inputs, dy (b, l, h, p) and d_final (b, h, p, n);
    options as in `hybridvlm.ssd.pallas.ssd_pallas`.
    """
    d = lay.dims_for(x.shape, B.shape, chunk_size, plan)
    o = lay.operands(x, dt, A, B, C, d)
    dyh = lay.heads_to_chunks(dy.astype(F32), d)
    hb, gb = lay.head_block, lay.group_block(d)
    common = dict(plan=plan, interpret=interpret)
    state = jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.P, d.N), F32)
    column = jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.cs, 1), F32)
    row = jax.ShapeDtypeStruct((d.b, d.h, d.nc, 1, d.cs), F32)

    u, v = lay.call(
        functools.partial(_states_kernel, precision=precision), d,
        in_specs=[hb(d.cs, d.P), gb, hb(d.cs, 1), hb(d.cs, d.P), gb, hb(d.cs, 1)],
        out_specs=[hb(d.P, d.N), hb(d.P, d.N)],
        out_shape=[state, state], name="ssd_bwd_states", **common,
    )(o.x, o.B, lay.col(o.to_end), dyh, o.C, lay.col(o.a_cum))

    chunk_decay = jnp.exp(o.a_cum[..., -1])
    s_start, _ = lay.chunk_states(chunk_decay, u, lay.pad_state(initial_state, d))
    d_end, d_initial = lay.state_cotangents(chunk_decay, v, lay.pad_state(d_final, d))

    # Where grid steps run in order (TPU), dB and dC accumulate over the heads
    # of a group in the kernel; elsewhere they are written per head and summed
    # here (a transient h / g times the size of B and C).
    accumulate = plan.ordered_grid
    if accumulate:
        r = d.heads_per_group
        grid, semantics = (d.b, d.g, d.nc, r), ("parallel", "parallel", "parallel", "arbitrary")
        hb = lambda *tail: pl.BlockSpec((None, None, None, *tail),
                                        lambda bi, gi, ci, ri: (bi, gi * r + ri, ci) + (0,) * len(tail))
        gb = pl.BlockSpec((None, None, None, d.cs, d.N), lambda bi, gi, ci, ri: (bi, gi, ci, 0, 0))
        bc_out, bc_shape = gb, jax.ShapeDtypeStruct((d.b, d.g, d.nc, d.cs, d.N), F32)
    else:
        grid, semantics = None, None
        bc_out, bc_shape = hb(d.cs, d.N), jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.cs, d.N), F32)
    dxh, dB, dC, dacol, darow, ddtcol, ddtrow = lay.call(
        functools.partial(_grad_kernel, accumulate=accumulate, precision=precision), d,
        in_specs=[hb(d.cs, d.P), gb, gb, hb(d.cs, d.P), hb(d.cs, 1), hb(1, d.cs), hb(1, d.cs), hb(d.cs, 1),
                  hb(d.P, d.N), hb(d.P, d.N)],
        out_specs=[hb(d.cs, d.P), bc_out, bc_out, hb(d.cs, 1), hb(1, d.cs), hb(d.cs, 1), hb(1, d.cs)],
        out_shape=[jax.ShapeDtypeStruct((d.b, d.h, d.nc, d.cs, d.P), F32), bc_shape, bc_shape,
                   column, row, column, row],
        grid=grid, semantics=semantics, name="ssd_bwd_grads", **common,
    )(o.x, o.B, o.C, dyh, lay.col(o.a_cum), lay.row(o.a_cum), lay.row(o.dt), lay.col(o.to_end), s_start, d_end)

    # a_cum_i = sum_{k <= i} dt_k A within the chunk: its cotangent flows back
    # to every earlier step of the chunk.
    d_step = jax.lax.cumsum(dacol[..., 0] + darow[..., 0, :], axis=3, reverse=True)  # (b, h, c, s)
    ddt = ddtcol[..., 0] + ddtrow[..., 0, :] + d_step * A.astype(F32)[None, :, None, None]
    # A reduction, not a dot: exact float32 on every backend, whatever `precision`.
    dA = jnp.sum(d_step * o.dt, axis=(0, 2, 3))
    if accumulate:
        group_sum = lambda v: rearrange(v, "b g c s n -> b (c s) g n")[:, : d.l, :, : d.n]
    else:
        group_sum = lambda v: reduce(v, "b (g r) c s n -> b (c s) g n", "sum", g=d.g)[:, : d.l, :, : d.n]
    return (
        lay.chunks_to_heads(dxh, d).astype(x.dtype),
        rearrange(ddt, "b h c s -> b (c s) h")[:, : d.l].astype(dt.dtype),
        dA.astype(A.dtype),
        group_sum(dB).astype(B.dtype),
        group_sum(dC).astype(C.dtype),
        d_initial[:, :, : d.p, : d.n].astype(initial_state.dtype),
    )
