"""Benchmark of the Mamba-2 SSD implementations on the current backend.

    python -m eval.bench_ssd                       # 12B Mamba-layer dims, 1k..32k tokens
    python -m eval.bench_ssd --lengths 1024,4096 --heads 8 --json out.json
    python -m eval.bench_ssd --help                # all flags

For each implementation, sequence length and mode ("fwd", "fwd_bwd"), the
compiled function is timed after a warm-up call with `block_until_ready`; the
table shows the median time, the speed relative to the chunked XLA path at the
same point, and FLOP/s achieved under one FLOP model (the chunked algorithm's
useful work) for all implementations. Implementations:
  chunked         plain XLA state-space duality (the baseline);
  pallas          Pallas forward and Pallas backward kernels;
  pallas_xla_bwd  Pallas forward, backward recomputed through the chunked XLA
                  path (the first backward; fwd_bwd rows only, its forward
                  is "pallas");
  sequential      `lax.scan` over time (the reference).

On CPU the Pallas kernels run in interpret mode: correct, but not a measure
of kernel speed. Once one measurement exceeds --max_seconds, longer lengths
of that implementation and mode are skipped (shown as "skipped"); a point
that fails (e.g. out of memory: the sequential path's backward keeps every
step's state) is shown as "failed" and also ends that row's lengths. Flags
are checked before anything runs; an error prints one line (`--debug` for
the traceback).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from eval.timing import timed
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.ssd.pallas import ssd_pallas
from hybridvlm.ssd import ssd_chunked, ssd_sequential


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only, so the eval modules can be
    imported together (they share flag names such as --config and --json)."""
    flags.DEFINE_list("impls", list(IMPLS), "Implementations to time.")
    flags.DEFINE_list("lengths", ["1024", "2048", "4096", "8192", "16384", "32768"], "Sequence lengths.")
    flags.DEFINE_list("modes", ["fwd", "fwd_bwd"], "fwd and/or fwd_bwd.")
    flags.DEFINE_integer("batch", 1, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("heads", 128, "Mamba heads (12B: 128).", lower_bound=1)
    flags.DEFINE_integer("head_dim", 80, "Mamba head dim (12B: 80).", lower_bound=1)
    flags.DEFINE_integer("state", 128, "SSM state size (12B: 128).", lower_bound=1)
    flags.DEFINE_integer("groups", 8, "B/C groups (12B: 8).", lower_bound=1)
    flags.DEFINE_integer("chunk", 128, "Chunk size (12B: 128).", lower_bound=1)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of x, B, C.")
    flags.DEFINE_integer("repeats", 3, "Timed calls per point (median reported).", lower_bound=1)
    flags.DEFINE_float("max_seconds", 30.0, "Skip longer lengths once a call takes longer.", lower_bound=0.0)
    flags.DEFINE_string("json", None, "Write results as JSON here.")


IMPLS = ("chunked", "pallas", "pallas_xla_bwd", "sequential")
MODES = ("fwd", "fwd_bwd")
# Implementations whose forward is another's: timed in fwd_bwd mode only.
BACKWARD_ONLY = ("pallas_xla_bwd",)


def flop_model(b, l, h, p, n, g, cs) -> float:
    """Useful FLOPs of the chunked SSD forward (x3 for forward + backward)."""
    return 2.0 * b * l * (g * cs * n + h * cs * p + 2 * h * p * n)


def make_fn(impl, chunk):
    if impl == "chunked":
        return lambda x, dt, A, B, C: ssd_chunked(x, dt, A, B, C, chunk_size=chunk)
    if impl == "pallas":
        return lambda x, dt, A, B, C: ssd_pallas(x, dt, A, B, C, chunk_size=chunk)
    if impl == "pallas_xla_bwd":
        return lambda x, dt, A, B, C: ssd_pallas(x, dt, A, B, C, chunk_size=chunk, backward="chunked")
    if impl == "sequential":
        return lambda x, dt, A, B, C: ssd_sequential(x, dt, A, B, C)
    raise cli.UsageError(f"--impls: unknown implementation {impl!r}; use {', '.join(IMPLS)}")


def make_inputs(b, l, h, p, n, g, dtype):
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (b, l, h, p), dtype)
    dt = jnp.exp(jax.random.uniform(keys[1], (b, l, h), minval=np.log(1e-3), maxval=np.log(0.1)))
    A = -jnp.linspace(1.0, 16.0, h)
    B = jax.random.normal(keys[2], (b, l, g, n), dtype)
    C = jax.random.normal(keys[3], (b, l, g, n), dtype)
    return x, dt, A, B, C


def run(impls, lengths, modes, *, b, h, p, n, g, cs, dtype, repeats, max_seconds, on_row=None):
    """Times every point; a point that fails (e.g. out of memory) is recorded, not fatal."""
    rows, too_slow = [], set()
    for l in lengths:
        args = make_inputs(b, l, h, p, n, g, dtype)
        for mode in modes:
            base = None
            for impl in impls:
                if mode == "fwd" and impl in BACKWARD_ONLY:
                    continue
                fwd = make_fn(impl, cs)
                if mode == "fwd":
                    fn = fwd
                else:
                    def fn(x, dt, A, B, C, fwd=fwd):
                        def loss(*a):
                            y, s = fwd(*a)
                            return jnp.sum(y) + jnp.sum(s)
                        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(x, dt, A, B, C)
                row = dict(impl=impl, length=l, mode=mode, seconds=None)
                if (impl, mode) not in too_slow:
                    try:
                        s, _ = timed(fn, args, repeats)
                    except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED
                        row["error"] = str(e).splitlines()[0][:120]
                        too_slow.add((impl, mode))
                        rows.append(row)
                        on_row and on_row(row)
                        continue
                    row["seconds"] = s
                    flops = flop_model(b, l, h, p, n, g, cs) * (3 if mode == "fwd_bwd" else 1)
                    row["gflops_per_s"] = flops / s / 1e9
                    if s > max_seconds:
                        too_slow.add((impl, mode))
                    if impl == "chunked":
                        base = s
                    row["speedup_vs_chunked"] = None if base is None else base / s
                rows.append(row)
                on_row and on_row(row)
    return rows


HEADER = f"{'impl':<15}{'length':>8} {'mode':<8}{'time (ms)':>12}{'vs chunked':>12}{'GFLOP/s':>10}"


def format_row(r) -> str:
    lead = f"{r['impl']:<15}{r['length']:>8} {r['mode']:<8}"
    if "error" in r:
        return lead + f"{'failed':>12}  {r['error']}"
    if r["seconds"] is None:
        return lead + f"{'skipped':>12}"
    rel = "" if r["speedup_vs_chunked"] is None else f"{r['speedup_vs_chunked']:.2f}x"
    return lead + f"{r['seconds'] * 1e3:>12.1f}{rel:>12}{r['gflops_per_s']:>10.1f}"


def parse_lengths(values) -> list[int]:
    """--lengths values as positive ints (UsageError naming the bad one)."""
    lengths = []
    for v in values:
        try:
            lengths.append(int(v))
        except ValueError:
            raise cli.UsageError(f"--lengths: {v!r} is not an integer") from None
        cli_checks.require(lengths[-1] >= 1, "--lengths", f"must be >= 1, got {lengths[-1]}")
    cli_checks.require(bool(lengths), "--lengths", "needs at least one length")
    return lengths


def check_choices(flag: str, values, choices) -> list[str]:
    values = list(values)
    for v in values:
        cli_checks.require(v in choices, flag, f"unknown value {v!r}; use {', '.join(choices)}")
    cli_checks.require(bool(values), flag, "needs at least one value")
    return values


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    # Everything is checked before anything is compiled.
    impls = check_choices("--impls", F.impls, IMPLS)
    modes = check_choices("--modes", F.modes, MODES)
    lengths = parse_lengths(F.lengths)
    cli_checks.require(F.heads % F.groups == 0, "--groups", f"{F.groups} does not divide --heads={F.heads}")
    if F.json:
        cli_checks.output_file("--json", F.json)
    if "chunked" in impls:  # the baseline is timed first at each point
        impls.remove("chunked")
        impls.insert(0, "chunked")
    dims = dict(b=F.batch, h=F.heads, p=F.head_dim, n=F.state, g=F.groups, cs=F.chunk)
    device = jax.devices()[0]
    print(f"backend={jax.default_backend()} device={device.device_kind} dims={dims} dtype={F.dtype}")
    print(HEADER, flush=True)
    rows = run(impls, lengths, modes, **dims, dtype=jnp.dtype(F.dtype), repeats=F.repeats,
               max_seconds=F.max_seconds, on_row=lambda r: print(format_row(r), flush=True))
    if F.json:
        atomic.write_json(F.json, dict(backend=jax.default_backend(), device=device.device_kind, dims=dims,
                                       dtype=F.dtype, rows=rows))


if __name__ == "__main__":
    cli.run(main, define_flags)
