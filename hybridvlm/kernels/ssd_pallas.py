"""Mamba-2 SSD forward as Pallas kernels around an associative scan over chunks.

Work split (per batch b, head h, chunk c; s = position in chunk):

  XLA      a = dt * A, a_cum = cumsum_s(a)             (Mosaic cannot lower cumsum)
  kernel 1 y_diag = (C B^T * exp(a_cum_i - a_cum_j) * dt_j * [j <= i]) x
           U_c    = x^T (B * exp(a_last - a_cum) * dt)        (chunk's own end state)
  XLA      S_c = exp(a_last_c) S_{c-1} + U_c as `lax.associative_scan` with
           (a1, u1) o (a2, u2) = (a1 a2, a2 u1 + u2); the initial state folds in
           as S_c += (prod_{k<=c} exp(a_last_k)) S_init
  kernel 2 y = y_diag + exp(a_cum) * (C S_{c-1}^T)             (incoming state)

Blocks satisfy TPU tiling by padding: chunk length to a multiple of 8, head
dim and state size to multiples of 128 (zeros are exact: they add nothing to
any dot product, and padded time steps have dt = 0, so they neither decay
nor feed the state). On GPU the padding is to powers of two (>= 16), which
the Triton lowering requires. On CPU the kernels run with `interpret=True`.

The backward pass recomputes through the chunked XLA path (`jax.custom_vjp`);
a Pallas backward kernel is future work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental import pallas as pl

from hybridvlm.ssd.chunked import ssd_chunked

_F32 = jnp.float32


@dataclass(frozen=True)
class TilePlan:
    """Padding rules for kernel blocks: multiples for (chunk, head_dim, d_state)."""

    chunk_multiple: int
    lane_multiple: int
    pow2: bool

    def pad_dim(self, n: int, multiple: int) -> int:
        if self.pow2:
            n = max(16, 1 << (n - 1).bit_length())
        return -(-n // multiple) * multiple


TPU_PLAN = TilePlan(chunk_multiple=8, lane_multiple=128, pow2=False)
GPU_PLAN = TilePlan(chunk_multiple=16, lane_multiple=16, pow2=True)


def plan_for_backend(backend: str) -> TilePlan:
    # Interpret mode on CPU uses the TPU plan so that tests exercise the
    # padding that TPU deployments use.
    return GPU_PLAN if backend in ("gpu", "cuda", "rocm") else TPU_PLAN


# ----------------------------------------------------------------- kernels
def _dot(a, b, contract):
    """2-D dot with float32 accumulation; contract = ((lhs_dim,), (rhs_dim,))."""
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=_F32)


def _chunk_local_kernel(x_ref, b_ref, c_ref, acol_ref, arow_ref, dtrow_ref, wcol_ref, y_ref, u_ref):
    """One (batch, head, chunk): intra-chunk output and the chunk's end state.

    x (s, p); b, c (s, n); acol (s, 1) and arow (1, s): cumulative log-decay;
    dtrow (1, s); wcol (s, 1) = exp(a_last - a_cum) * dt, each step's weight
    in the chunk's end state. Writes y (s, p) and u (p, n).
    """
    s = x_ref.shape[0]
    x = x_ref[...].astype(_F32)
    Bm = b_ref[...].astype(_F32)
    Cm = c_ref[...].astype(_F32)
    acol, arow = acol_ref[...], arow_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (s, s), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (s, s), 1)
    decay = jnp.exp(jnp.where(rows >= cols, acol - arow, -jnp.inf))  # (s, s)
    cb = _dot(Cm, Bm, ((1,), (1,)))  # (s, s) = C B^T
    y_ref[...] = _dot(cb * decay * dtrow_ref[...], x, ((1,), (0,))).astype(y_ref.dtype)
    weighted_b = Bm * wcol_ref[...]  # (s, n)
    u_ref[...] = _dot(x, weighted_b, ((0,), (0,))).astype(u_ref.dtype)  # (p, n)


def _state_readout_kernel(y_ref, c_ref, acol_ref, s_ref, out_ref):
    """One (batch, head, chunk): adds the incoming state's contribution.

    y (s, p) intra-chunk output; c (s, n); acol (s, 1); s (p, n) state entering.
    """
    contrib = _dot(c_ref[...].astype(_F32), s_ref[...], ((1,), (1,)))  # (s, p)
    out_ref[...] = (y_ref[...] + jnp.exp(acol_ref[...]) * contrib).astype(out_ref.dtype)


# ------------------------------------------------------------------ driver
def _pad_axis(v, axis, size):
    extra = size - v.shape[axis]
    if extra == 0:
        return v
    widths = [(0, 0)] * v.ndim
    widths[axis] = (0, extra)
    return jnp.pad(v, widths)


def _combine(left, right):
    """Associative operator of the linear recurrence S = a S_prev + u."""
    a1, u1 = left
    a2, u2 = right
    return a1 * a2, a2[..., None, None] * u1 + u2


def _compiler_params(plan: TilePlan, interpret: bool):
    """Backend selection: Triton params on GPU (see module docstring), default elsewhere."""
    if interpret or not plan.pow2:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _forward(x, dt, A, B, C, initial_state, *, chunk_size, plan: TilePlan, interpret: bool):
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    cs = -(-chunk_size // plan.chunk_multiple) * plan.chunk_multiple
    if plan.pow2:
        cs = plan.pad_dim(cs, plan.chunk_multiple)
    nc = -(-l // cs)
    L = nc * cs
    P, N = plan.pad_dim(p, plan.lane_multiple), plan.pad_dim(n, plan.lane_multiple)

    # Head-major, chunked layouts; padded positions have x = B = C = dt = 0.
    xh = rearrange(_pad_axis(_pad_axis(x, 1, L), 3, P), "b (c s) h p -> b h c s p", s=cs)
    Bg = rearrange(_pad_axis(_pad_axis(B, 1, L), 3, N), "b (c s) g n -> b g c s n", s=cs)
    Cg = rearrange(_pad_axis(_pad_axis(C, 1, L), 3, N), "b (c s) g n -> b g c s n", s=cs)
    dth = rearrange(_pad_axis(dt.astype(_F32), 1, L), "b (c s) h -> b h c s", s=cs)
    a_cum = jnp.cumsum(dth * A.astype(_F32)[None, :, None, None], axis=-1)  # (b, h, c, s)
    to_end = jnp.exp(a_cum[..., -1:] - a_cum) * dth  # (b, h, c, s)

    col = lambda v: v[..., None]  # (b, h, c, s, 1)
    row = lambda v: v[..., None, :]  # (b, h, c, 1, s)
    head_block = lambda *tail: pl.BlockSpec((None, None, None, *tail), lambda bi, hi, ci: (bi, hi, ci, 0, 0))
    group_block = pl.BlockSpec((None, None, None, cs, N), lambda bi, hi, ci: (bi, hi // r, ci, 0, 0))
    grid = (b, h, nc)

    y_diag, u = pl.pallas_call(
        _chunk_local_kernel,
        grid=grid,
        in_specs=[head_block(cs, P), group_block, group_block, head_block(cs, 1), head_block(1, cs),
                  head_block(1, cs), head_block(cs, 1)],
        out_specs=[head_block(cs, P), head_block(P, N)],
        out_shape=[jax.ShapeDtypeStruct((b, h, nc, cs, P), _F32), jax.ShapeDtypeStruct((b, h, nc, P, N), _F32)],
        interpret=interpret,
        compiler_params=_compiler_params(plan, interpret),
        name="ssd_chunk_local",
    )(xh, Bg, Cg, col(a_cum), row(a_cum), row(dth), col(to_end))

    # Inter-chunk recurrence over c (axis 2) as an associative scan.
    chunk_decay = jnp.exp(a_cum[..., -1])  # (b, h, c)
    decay_prod, s_end = jax.lax.associative_scan(_combine, (chunk_decay, u), axis=2)
    if initial_state is not None:
        s0 = _pad_axis(_pad_axis(initial_state.astype(_F32), 2, P), 3, N)  # (b, h, P, N)
        s_end = s_end + decay_prod[..., None, None] * s0[:, :, None]
    else:
        s0 = jnp.zeros((b, h, P, N), _F32)
    s_start = jnp.concatenate([s0[:, :, None], s_end[:, :, :-1]], axis=2)  # (b, h, c, P, N)

    y = pl.pallas_call(
        _state_readout_kernel,
        grid=grid,
        in_specs=[head_block(cs, P), group_block, head_block(cs, 1), head_block(P, N)],
        out_specs=head_block(cs, P),
        out_shape=jax.ShapeDtypeStruct((b, h, nc, cs, P), _F32),
        input_output_aliases={0: 0},
        interpret=interpret,
        compiler_params=_compiler_params(plan, interpret),
        name="ssd_state_readout",
    )(y_diag, Cg, col(a_cum), s_start)

    y = rearrange(y, "b h c s p -> b (c s) h p")[:, :l, :, :p]
    return y, s_end[:, :, -1, :p, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _ssd_pallas(x, dt, A, B, C, initial_state, chunk_size, plan, interpret):
    return _forward(x, dt, A, B, C, initial_state, chunk_size=chunk_size, plan=plan, interpret=interpret)


def _ssd_pallas_fwd(x, dt, A, B, C, initial_state, chunk_size, plan, interpret):
    out = _forward(x, dt, A, B, C, initial_state, chunk_size=chunk_size, plan=plan, interpret=interpret)
    return out, (x, dt, A, B, C, initial_state)


def _ssd_pallas_bwd(chunk_size, plan, interpret, residuals, cotangents):
    # Recompute through the chunked XLA path: same math, differentiable by JAX.
    del plan, interpret
    chunked = lambda x, dt, A, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=s0)
    _, vjp = jax.vjp(chunked, *residuals)
    return vjp(cotangents)


_ssd_pallas.defvjp(_ssd_pallas_fwd, _ssd_pallas_bwd)


def ssd_pallas(x, dt, A, B, C, *, chunk_size, initial_state=None, interpret=None, plan=None):
    """Pallas SSD forward (custom_vjp backward through the chunked XLA path).

    Args:
      x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n).
      chunk_size: chunk length (rounded up to the backend's tile multiple).
      initial_state: (b, h, p, n) or None.
      interpret: run the kernels in interpret mode; default: on CPU.
      plan: TilePlan override; default from the backend.
    Returns:
      y (b, l, h, p) float32 and final state (b, h, p, n) float32.
    """
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    plan = plan or plan_for_backend(backend)
    if initial_state is None:
        b, _, h, p = x.shape
        initial_state = jnp.zeros((b, h, p, B.shape[-1]), _F32)
    return _ssd_pallas(x, dt, A, B, C, initial_state, chunk_size, plan, interpret)
