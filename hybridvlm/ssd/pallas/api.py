"""Mamba-2 SSD as Pallas kernels around an associative scan over chunks.

Forward (pallas/forward.py): per (batch, head, chunk) the chunk-local
output and end state run in Pallas; the inter-chunk recurrence
S_c = exp(a_last_c) S_{c-1} + U_c runs as `lax.associative_scan` with
(a1, u1) o (a2, u2) = (a1 a2, a2 u1 + u2); a second kernel adds each
chunk's incoming-state readout. Cumulative sums stay in XLA.

Backward (pallas/backward.py), through `jax.custom_vjp`: Pallas kernels
for the per-chunk cotangents around the same scan run backwards over chunks.
`backward="chunked"` recomputes through the chunked XLA path instead (the
first implementation; kept as a cross-check and a benchmark baseline).

Backends: TPU lowers through Mosaic. On GPU the kernels are lowered through
Pallas' Triton backend (selected by its compiler params): JAX 0.10's default
Mosaic GPU lowering of `pallas_call` rejects these block programs (shared
memory over the limit, 16-byte stride rule for (s, 1) blocks) and is itself
deprecated for `pallas_call` in favour of `plgpu.kernel`. On CPU the kernels
run with `interpret=True`. Tiling and padding: pallas/layout.py.

Matmul precision is explicit (`precision=`, see layout.PRECISIONS):
"default" runs the kernels' float32 dots as bf16 MXU passes on TPU and TF32
on GPU, like XLA's matmuls at JAX's default precision; "highest" keeps
float32 products on both. On CPU every dot is exact float32 either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from hybridvlm.ssd.pallas.backward import ssd_backward
from hybridvlm.ssd.pallas.forward import ssd_forward
from hybridvlm.ssd.pallas.layout import GPU_PLAN, PRECISIONS, TPU_PLAN, TilePlan, check_precision, plan_for_backend
from hybridvlm.ssd.chunked import ssd_chunked
from hybridvlm.ssd.shapes import check_inputs

__all__ = ["ssd_pallas", "TilePlan", "TPU_PLAN", "GPU_PLAN", "plan_for_backend", "BACKWARDS", "PRECISIONS"]

BACKWARDS = ("pallas", "chunked")


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _ssd(x, dt, A, B, C, initial_state, chunk_size, plan, interpret, backward, precision):
    return ssd_forward(x, dt, A, B, C, initial_state, chunk_size=chunk_size, plan=plan, interpret=interpret,
                       precision=precision)


def _ssd_fwd(x, dt, A, B, C, initial_state, chunk_size, plan, interpret, backward, precision):
    out = ssd_forward(x, dt, A, B, C, initial_state, chunk_size=chunk_size, plan=plan, interpret=interpret,
                      precision=precision)
    # Chunk states are recomputed in the backward pass rather than saved: they
    # are (P x N) per chunk and head, more memory than the inputs at 12B dims.
    return out, (x, dt, A, B, C, initial_state)


def _ssd_bwd(chunk_size, plan, interpret, backward, precision, residuals, cotangents):
    dy, d_final = cotangents
    if backward == "pallas":
        return ssd_backward(*residuals, dy, d_final, chunk_size=chunk_size, plan=plan, interpret=interpret,
                            precision=precision)
    chunked = lambda x, dt, A, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=s0)
    _, vjp = jax.vjp(chunked, *residuals)
    return vjp(cotangents)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_pallas(x, dt, A, B, C, *, chunk_size, initial_state=None, interpret=None, plan=None, backward="pallas",
               precision="default"):
    """Pallas SSD with a custom_vjp backward.

    Args:
      x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, g, n).
      chunk_size: chunk length (rounded up to the backend's tile multiple).
      initial_state: (b, h, p, n) or None.
      interpret: run the kernels in interpret mode; default: on CPU.
      plan: TilePlan override; default from the backend.
      backward: "pallas" (kernels) or "chunked" (recompute through chunked XLA).
      precision: matmul precision of the kernels' dots: "default" (bf16 passes
        on TPU, TF32 on GPU), "highest" (float32), or "emulate_bf16" /
        "emulate_tf32" (operands rounded as those passes do; for tests on CPU).
    Returns:
      y (b, l, h, p) float32 and final state (b, h, p, n) float32.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward: unknown implementation {backward!r}; use one of {BACKWARDS}")
    check_precision(precision)
    check_inputs(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    backend = jax.default_backend()
    if interpret is None:
        interpret = backend == "cpu"
    plan = plan or plan_for_backend(backend)
    if initial_state is None:
        b, _, h, p = x.shape
        initial_state = jnp.zeros((b, h, p, B.shape[-1]), jnp.float32)
    return _ssd(x, dt, A, B, C, initial_state, chunk_size, plan, interpret, backward, precision)
