"""Timing of compiled JAX functions, shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed(fn, args, repeats: int):
    """Median seconds of `repeats` calls of the AOT-compiled fn, after a warm-up; and the compile seconds."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s
