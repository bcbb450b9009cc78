"""Mamba-2 SSD implementations and the dispatch between them.

`ssd(..., impl=...)` picks an implementation by name:
  "sequential": `lax.scan` over time (the reference; slow, exact);
  "chunked":    the chunked state-space-duality algorithm in plain XLA;
  "pallas":     Pallas kernels for the chunk-local work, forward and backward,
                around associative scans over chunk states
                (`hybridvlm.ssd.pallas`); interpret mode on CPU;
  "auto":       "pallas" on TPU and GPU, "chunked" on CPU.
All return (y, final_state) and accept an initial state, so a prefill can
hand its state to decoding.
"""

from __future__ import annotations

import jax

from hybridvlm.config import SSD_CHUNK_GROUP
from hybridvlm.ssd.chunked import ssd_chunked
from hybridvlm.ssd.pallas import ssd_pallas
from hybridvlm.ssd.reference import ssd_sequential, ssd_step
from hybridvlm.ssd.shapes import check_inputs

__all__ = ["ssd", "ssd_chunked", "ssd_pallas", "ssd_sequential", "ssd_step", "resolve_impl", "IMPLS"]

IMPLS = ("auto", "chunked", "sequential", "pallas")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """Maps "auto" to a concrete implementation for `backend` (default: JAX's)."""
    if impl not in IMPLS:
        raise ValueError(f"ssd_impl: unknown implementation {impl!r}; use one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    # The interpret-mode kernels are correct on CPU but slower than XLA there.
    return "chunked" if backend == "cpu" else "pallas"


def ssd(x, dt, A, B, C, *, chunk_size, initial_state=None, impl="auto", chunk_group=SSD_CHUNK_GROUP,
        precision="default"):
    """Mamba-2 SSD without the D skip.

    Args:
      x: (b, l, h, p); dt: (b, l, h) after softplus/clamp; A: (h,) negative.
      B, C: (b, l, g, n); initial_state: (b, h, p, n) or None.
      chunk_group: chunks per group of the chunked path (its memory bound;
        see `ssd_chunked`); the other paths ignore it.
      precision: matmul precision of the Pallas kernels ("default": bf16
        passes on TPU, TF32 on GPU; "highest": float32); the XLA paths use
        JAX's default matmul precision.
    Returns:
      y (b, l, h, p) float32 and final state (b, h, p, n) float32.
    """
    impl = resolve_impl(impl)
    check_inputs(x, dt, A, B, C, initial_state, chunk_size=chunk_size)
    if impl == "sequential":
        return ssd_sequential(x, dt, A, B, C, initial_state=initial_state)
    if impl == "pallas":
        return ssd_pallas(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state, precision=precision)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state, chunk_group=chunk_group)
