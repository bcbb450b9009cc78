"""Shared layout of the Pallas SSD kernels: tiling, chunked operands, block specs,
and the associative scan over chunk states.

Blocks satisfy TPU tiling by padding: chunk length to a multiple of 8, head
dim and state size to multiples of 128 (zeros are exact: they add nothing to
any dot product, and padded time steps have dt = 0, so they neither decay
nor feed the state). On GPU the padding is to powers of two (>= 16), which
the Triton lowering requires.

Index names: b batch, h head, g B/C group (heads [g r, (g + 1) r) share it),
c chunk, s position in chunk, P padded head dim, N padded state size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclass(frozen=True)
class TilePlan:
    """Padding rules for kernel blocks: multiples for (chunk, head_dim, d_state).

    `ordered_grid`: grid steps run one after another (TPU), so an output block
    may accumulate over consecutive steps; on GPU they run in parallel.
    """

    chunk_multiple: int
    lane_multiple: int
    pow2: bool
    ordered_grid: bool

    def pad_dim(self, n: int, multiple: int) -> int:
        if self.pow2:
            n = max(16, 1 << (n - 1).bit_length())
        return -(-n // multiple) * multiple


TPU_PLAN = TilePlan(chunk_multiple=8, lane_multiple=128, pow2=False, ordered_grid=True)
GPU_PLAN = TilePlan(chunk_multiple=16, lane_multiple=16, pow2=True, ordered_grid=False)


def plan_for_backend(backend: str) -> TilePlan:
    # Interpret mode on CPU uses the TPU plan so that tests exercise the
    # padding that TPU deployments use.
    return GPU_PLAN if backend in ("gpu", "cuda", "rocm") else TPU_PLAN


@dataclass(frozen=True)
class Dims:
    """Problem sizes: true (l, p, n) and padded (cs, nc, P, N)."""

    b: int
    l: int
    h: int
    p: int
    g: int
    n: int
    cs: int
    nc: int
    P: int
    N: int

    @property
    def heads_per_group(self) -> int:
        return self.h // self.g


def dims_for(x_shape, bc_shape, chunk_size: int, plan: TilePlan) -> Dims:
    b, l, h, p = x_shape
    g, n = bc_shape[-2:]
    cs = -(-chunk_size // plan.chunk_multiple) * plan.chunk_multiple
    if plan.pow2:
        cs = plan.pad_dim(cs, plan.chunk_multiple)
    return Dims(b, l, h, p, g, n, cs, -(-l // cs), plan.pad_dim(p, plan.lane_multiple),
                plan.pad_dim(n, plan.lane_multiple))


def pad_axis(v, axis, size):
    extra = size - v.shape[axis]
    if extra == 0:
        return v
    widths = [(0, 0)] * v.ndim
    widths[axis] = (0, extra)
    return jnp.pad(v, widths)


def heads_to_chunks(v, d: Dims):
    """(b, l, h, p) -> (b, h, c, s, P), zero-padded."""
    v = pad_axis(pad_axis(v, 1, d.nc * d.cs), 3, d.P)
    return rearrange(v, "b (c s) h p -> b h c s p", s=d.cs)


def chunks_to_heads(v, d: Dims):
    """(b, h, c, s, P) -> (b, l, h, p), padding dropped."""
    return rearrange(v, "b h c s p -> b (c s) h p")[:, : d.l, :, : d.p]


def groups_to_chunks(v, d: Dims):
    """(b, l, g, n) -> (b, g, c, s, N), zero-padded."""
    v = pad_axis(pad_axis(v, 1, d.nc * d.cs), 3, d.N)
    return rearrange(v, "b (c s) g n -> b g c s n", s=d.cs)


def pad_state(s, d: Dims):
    """(b, h, p, n) -> (b, h, P, N) float32."""
    return pad_axis(pad_axis(s.astype(F32), 2, d.P), 3, d.N)


class Operands(NamedTuple):
    """Kernel operands in the padded chunk layout."""

    x: jax.Array  # (b, h, c, s, P)
    B: jax.Array  # (b, g, c, s, N)
    C: jax.Array  # (b, g, c, s, N)
    dt: jax.Array  # (b, h, c, s) float32
    a_cum: jax.Array  # (b, h, c, s) cumulative log-decay in the chunk
    to_end: jax.Array  # (b, h, c, s) exp(a_last - a_cum) dt: weight of each step in the chunk's end state


def operands(x, dt, A, B, C, d: Dims) -> Operands:
    """x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n) -> chunked, padded operands.

    The cumulative sum stays in XLA: Mosaic cannot lower it.
    """
    dth = rearrange(pad_axis(dt.astype(F32), 1, d.nc * d.cs), "b (c s) h -> b h c s", s=d.cs)
    a_cum = jnp.cumsum(dth * A.astype(F32)[None, :, None, None], axis=-1)
    to_end = jnp.exp(a_cum[..., -1:] - a_cum) * dth
    return Operands(heads_to_chunks(x, d), groups_to_chunks(B, d), groups_to_chunks(C, d), dth, a_cum, to_end)


def col(v):
    """(..., s) -> (..., s, 1): a per-position column operand."""
    return v[..., None]


def row(v):
    """(..., s) -> (..., 1, s): a per-position row operand."""
    return v[..., None, :]


def head_block(*tail):
    """Block of one (batch, head, chunk) grid cell over a (b, h, c, *tail) array."""
    return pl.BlockSpec((None, None, None, *tail), lambda bi, hi, ci: (bi, hi, ci) + (0,) * len(tail))


def group_block(d: Dims):
    """Block of the cell's B/C group over a (b, g, c, s, N) array."""
    r = d.heads_per_group
    return pl.BlockSpec((None, None, None, d.cs, d.N), lambda bi, hi, ci: (bi, hi // r, ci, 0, 0))


def compiler_params(plan: TilePlan, interpret: bool, semantics: tuple[str, ...]):
    """Backend selection: Triton params on GPU (see kernels/ssd_pallas.py), Mosaic on TPU.

    `semantics` names each grid axis "parallel" or "arbitrary" (accumulating).
    """
    if interpret:
        return None
    if plan.pow2:
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=semantics)


def call(kernel, d: Dims, *, in_specs, out_specs, out_shape, plan, interpret, name, grid=None,
         semantics=None, **kwargs):
    """`pallas_call` with the plan's compiler params; default grid (b, h, c), all parallel."""
    grid = grid or (d.b, d.h, d.nc)
    semantics = semantics or ("parallel",) * len(grid)
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape, interpret=interpret,
        compiler_params=compiler_params(plan, interpret, semantics), name=name, **kwargs,
    )


# Matmul precision of the kernels' dots (all float32 x float32 -> float32), by name:
#   "default": the backend's fast path, as XLA's own matmuls at JAX's default
#              precision: bf16 MXU passes on TPU (Mosaic's default), TF32 tensor
#              cores on GPU (Triton). Operands keep 8 (bf16) or 11 (TF32)
#              significant bits; products are accumulated in float32.
#   "highest": float32 products: Mosaic's fp32 contract precision (several bf16
#              passes) on TPU, IEEE float32 on GPU. Slower.
#   "emulate_bf16", "emulate_tf32": operands rounded as those passes round them
#              (bf16: to nearest even; TF32: truncated to 10 mantissa bits, the
#              worse of the roundings GPUs apply), then an exact float32 dot.
#              For tests: on CPU, interpret mode computes every float32 dot
#              exactly, whatever the precision flag says.
# Mosaic accepts only lax's DEFAULT and HIGHEST (not HIGH); Triton maps DEFAULT
# (and HIGH) to TF32 and HIGHEST to IEEE.
PRECISIONS = ("default", "highest", "emulate_bf16", "emulate_tf32")
_LAX_PRECISION = {
    "default": jax.lax.Precision.DEFAULT,
    "highest": jax.lax.Precision.HIGHEST,
    "emulate_bf16": jax.lax.Precision.HIGHEST,
    "emulate_tf32": jax.lax.Precision.HIGHEST,
}
TF32_MASK = -(1 << 13)  # 0xFFFFE000 as int32: sign, exponent and the top 10 mantissa bits


def round_to_bf16(v):
    """float32 -> float32 holding the nearest bfloat16 (8 significant bits, ties to even)."""
    return v.astype(jnp.bfloat16).astype(F32)


def truncate_to_tf32(v):
    """float32 -> float32 with the low 13 of its 23 mantissa bits cleared (TF32's 10 kept)."""
    bits = jax.lax.bitcast_convert_type(v.astype(F32), jnp.int32)
    return jax.lax.bitcast_convert_type(bits & TF32_MASK, F32)


_OPERAND_ROUNDING = {"emulate_bf16": round_to_bf16, "emulate_tf32": truncate_to_tf32}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown matmul precision {precision!r}; use one of {PRECISIONS}")


def dot(a, b, contract, precision):
    """2-D dot, float32 accumulation at the named `precision` (see PRECISIONS).

    contract = ((lhs_dim,), (rhs_dim,)).
    """
    rounding = _OPERAND_ROUNDING.get(precision)
    if rounding is not None:
        a, b = rounding(a), rounding(b)
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=_LAX_PRECISION[precision],
                               preferred_element_type=F32)


def combine(left, right):
    """Associative operator of the linear recurrence S = a S_prev + u."""
    a1, u1 = left
    a2, u2 = right
    return a1 * a2, a2[..., None, None] * u1 + u2


def chunk_states(chunk_decay, u, s0):
    """States entering and leaving each chunk, by an associative scan over chunks.

    Args:
      chunk_decay: (b, h, c) exp(a_last) of each chunk; u: (b, h, c, P, N) each
        chunk's own end state; s0: (b, h, P, N) initial state.
    Returns:
      s_start (b, h, c, P, N): the state entering chunk c; s_final (b, h, P, N).
    """
    decay_prod, s_end = jax.lax.associative_scan(combine, (chunk_decay, u), axis=2)
    s_end = s_end + decay_prod[..., None, None] * s0[:, :, None]
    s_start = jnp.concatenate([s0[:, :, None], s_end[:, :, :-1]], axis=2)
    return s_start, s_end[:, :, -1]


def state_cotangents(chunk_decay, v, d_final):
    """Cotangents of the states, by the same scan run from the last chunk back.

    The state entering chunk c reaches the loss through chunk c's readout (v_c)
    and through the state leaving chunk c, which is chunk_decay_c times it, so
    K_c = v_c + chunk_decay_c K_{c+1}, with K_{nc} the final state's cotangent.

    Args:
      chunk_decay: (b, h, c); v: (b, h, c, P, N) readout cotangent of each
        chunk's incoming state; d_final: (b, h, P, N).
    Returns:
      d_end (b, h, c, P, N): cotangent of the state leaving chunk c;
      d_initial (b, h, P, N): cotangent of the initial state.
    """
    decay_prod, k = jax.lax.associative_scan(combine, (chunk_decay, v), axis=2, reverse=True)
    k = k + decay_prod[..., None, None] * d_final[:, :, None]
    d_end = jnp.concatenate([k[:, :, 1:], d_final[:, :, None]], axis=2)
    return d_end, k[:, :, 0]
