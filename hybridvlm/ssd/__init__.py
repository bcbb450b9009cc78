"""Mamba-2 SSD implementations and the dispatch between them.

`ssd(..., impl=...)` picks an implementation by name:
  "sequential": `lax.scan` over time (the reference; slow, exact);
  "chunked":    the chunked state-space-duality algorithm in plain XLA;
  "auto":       the best available for the current backend (today "chunked").
All return (y, final_state) and accept an initial state, so a prefill can
hand its state to decoding.
"""

from __future__ import annotations

from hybridvlm.ssd.chunked import ssd_chunked
from hybridvlm.ssd.reference import ssd_sequential, ssd_step

__all__ = ["ssd", "ssd_chunked", "ssd_sequential", "ssd_step", "resolve_impl"]


def resolve_impl(impl: str) -> str:
    """Maps "auto" to a concrete implementation for the default backend."""
    if impl == "auto":
        # The Pallas kernel (GPU/TPU) is not part of the package yet; the
        # chunked XLA path is the fastest correct choice on every backend.
        return "chunked"
    if impl not in ("chunked", "sequential"):
        raise ValueError(f"ssd_impl: unknown implementation {impl!r}; use 'auto', 'chunked' or 'sequential'")
    return impl


def ssd(x, dt, A, B, C, *, chunk_size, initial_state=None, impl="auto"):
    """Mamba-2 SSD without the D skip.

    Args:
      x: (b, l, h, p); dt: (b, l, h) after softplus/clamp; A: (h,) negative.
      B, C: (b, l, g, n); initial_state: (b, h, p, n) or None.
    Returns:
      y (b, l, h, p) float32 and final state (b, h, p, n) float32.
    """
    impl = resolve_impl(impl)
    if impl == "sequential":
        return ssd_sequential(x, dt, A, B, C, initial_state=initial_state)
    return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state)
