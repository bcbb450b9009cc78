"""XLA's memory analysis of the 12B LM's long-video prefill (compiled, never run).

    python -m eval.bench_memory                              # 64 / 128 / 256 frames, full and the paper's plan
    python -m eval.bench_memory --frames 128 --json out.json
    python -m eval.bench_memory --layers 9 --frames 128      # the first 9 layers of the 12B pattern
    python -m eval.bench_memory --runlocal                   # small widths and prompt: a few seconds

The LM of `configs/nemotron_h_12b.py` (bfloat16 parameters) prefills a video
prompt, batch 1: `frames` x `tokens_per_frame` visual tokens followed by
`text` text tokens (the question), into a cache of exactly that length. Each
point is the prefill in full and with the paper's plan at `budget`
(`reduction.progressive(num_layers, num_visual, budget)`, the low-to-high step
schedule, scored visual tokens). The model is built abstractly
(`nnx.eval_shape`) and the prefill lowered and compiled from
`jax.ShapeDtypeStruct`s: no parameter or activation is allocated, no weights
are needed.

The table shows XLA's `memory_analysis()` of each compiled program:
parameters (the model's weights), temporaries (XLA's buffers inside the
program), outputs (the cache and the last logits), their total, and whether
that total fits an 80 GB GPU with room for the runtime (<= 75 GiB).

The analysis is the compiler's of the backend it runs on. On a CPU-only
machine it is the CPU compiler's: it differs from a GPU compiler's in what it
fuses and when it schedules work (its YNNPACK fusions keep their internal
intermediates out of the count; without them it converts bfloat16 weights to
float32 copies), so read it as an estimate of a GPU's, not a measurement.
"""

from __future__ import annotations

import math
import os
import platform
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from configs import nemotron_h_12b
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.lm import NemotronHForCausalLM
from reduction.plan import progressive

GiB = 2**30
FIT_GIB = 75.0  # an 80 GB card holds 80 GiB; 5 are left to the runtime (CUDA context, workspaces)
# --runlocal: a small model and prompt (seconds to compile), the 12B pattern's first layers.
RUNLOCAL_MODEL = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, n_groups=2,
                      chunk_size=32, vocab_size=512, seq_block=256, ssd_chunk_group=2)
RUNLOCAL = dict(layers=9, frames=[2, 4], tokens_per_frame=64, text=16)


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only (the eval modules share flag names)."""
    flags.DEFINE_list("frames", ["64", "128", "256"], "Video frames of each point.")
    flags.DEFINE_integer("tokens_per_frame", 256, "Visual tokens per frame.")
    flags.DEFINE_integer("text", 128, "Text tokens after the video.")
    flags.DEFINE_float("budget", 0.25, "Visual-token budget of the paper's plan (0: full prefill only).")
    flags.DEFINE_integer("layers", None, "Only the first N layers of the 12B pattern (default: all 62).")
    flags.DEFINE_integer("seq_block", None, "LMConfig.seq_block (default: the config's).")
    flags.DEFINE_integer("ssd_chunk_group", None, "LMConfig.ssd_chunk_group (default: the config's).")
    flags.DEFINE_bool("runlocal", False, f"Small widths, {RUNLOCAL['layers']} layers and a short prompt.")
    flags.DEFINE_string("json", None, "Write the rows, the config and machine info as JSON here.")


def lm_config(*, layers: int | None = None, runlocal: bool = False, **overrides) -> LMConfig:
    """The 12B LM's config, optionally cut to its first `layers` layers, shrunk, or overridden."""
    kw = dict(nemotron_h_12b.get_config().model)
    if runlocal:
        kw.update(RUNLOCAL_MODEL)
    if layers is not None:
        kw["pattern"] = kw["pattern"][:layers]
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return LMConfig(**kw)


def analyse(cfg: LMConfig, *, frames: int, tokens_per_frame: int, text: int, budget: float | None) -> dict:
    """Compiles the bfloat16 prefill abstractly; returns its memory analysis (GiB) as a row."""
    model = nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    graphdef, state = nnx.split(model)
    num_visual = frames * tokens_per_frame
    t = num_visual + text
    plan = progressive(cfg.num_layers, num_visual, budget) if budget else None

    def prefill(state, ids, mask, visual):
        m = nnx.merge(graphdef, state)
        return m.prefill(ids, mask, t, reduction=plan, visual_mask=visual if plan is not None else None)

    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    t0 = time.perf_counter()
    mem = jax.jit(prefill).lower(state, ids, mask, mask).compile().memory_analysis()
    compile_s = time.perf_counter() - t0
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state)) / GiB
    temp, out = mem.temp_size_in_bytes / GiB, mem.output_size_in_bytes / GiB
    total = params + temp + out
    return dict(frames=frames, tokens=t, num_visual=num_visual, plan="full" if plan is None else plan.name,
                budget=1.0 if plan is None else budget,
                stages=[] if plan is None else [list(s) for s in plan.stages],
                params_gib=params, temp_gib=temp, output_gib=out, total_gib=total, fits_80gb=fits(total),
                compile_seconds=compile_s)


def fits(total_gib: float) -> bool:
    """Whether a program of this many GiB fits one 80 GB GPU, with room for the runtime and workspace."""
    return total_gib <= FIT_GIB


HEADER = (f"{'frames':>6}{'tokens':>8}  {'plan':<18}{'params':>8}{'temp':>8}{'out':>8}{'total':>8}"
          f"  {'fits 80GB':<10}{'compile':>8}")


def format_row(r, unit: str = "GiB") -> str:
    """One table row; sizes in `unit` (GiB, or MiB for the small --runlocal model)."""
    scale = 1024 if unit == "MiB" else 1
    size = lambda key: f"{r[key] * scale:>8.2f}"
    return (f"{r['frames']:>6}{r['tokens']:>8}  {r['plan']:<18}{size('params_gib')}{size('temp_gib')}"
            f"{size('output_gib')}{size('total_gib')}  {'yes' if r['fits_80gb'] else 'NO':<10}"
            f"{r['compile_seconds']:>7.1f}s")


def machine_info() -> dict:
    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=dev.device_kind, cpu_count=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(), jax=jax.__version__)


def parse_frames(values) -> list[int]:
    out = []
    for v in values:
        try:
            out.append(cli_checks.at_least("--frames", int(v), 1))
        except ValueError:
            raise cli.UsageError(f"--frames: {v!r} is not an integer") from None
    cli_checks.require(bool(out), "--frames", "needs at least one frame count")
    return out


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    frames, tokens_per_frame, text, layers = parse_frames(F.frames), F.tokens_per_frame, F.text, F.layers
    if F.runlocal:  # its own sizes unless given explicitly
        given = lambda name: not F[name].using_default_value
        frames = frames if given("frames") else RUNLOCAL["frames"]
        tokens_per_frame = tokens_per_frame if given("tokens_per_frame") else RUNLOCAL["tokens_per_frame"]
        text = text if given("text") else RUNLOCAL["text"]
        layers = layers if layers is not None else RUNLOCAL["layers"]
    cli_checks.at_least("--tokens_per_frame", tokens_per_frame, 1)
    cli_checks.at_least("--text", text, 1)
    cli_checks.in_range("--budget", F.budget, 0.0, 1.0)
    if layers is not None:
        cli_checks.in_range("--layers", layers, 1, len(nemotron_h_12b.PATTERN))
    for name in ("seq_block", "ssd_chunk_group"):
        if F[name].value is not None:
            cli_checks.at_least(f"--{name}", F[name].value, 0)
    if F.json:
        cli_checks.output_file("--json", F.json)
    try:
        cfg = lm_config(layers=layers, runlocal=F.runlocal, seq_block=F.seq_block, ssd_chunk_group=F.ssd_chunk_group)
    except ConfigError as e:
        raise cli.UsageError(str(e)) from None
    info = machine_info()
    unit = "MiB" if F.runlocal else "GiB"
    print(f"XLA memory analysis of the compiled bf16 prefill (compile only, nothing allocated): the "
          f"{info['backend'].upper()} compiler's"
          + (" (a CPU compiler's estimate of a GPU's: see --help)" if info["backend"] == "cpu" else ""))
    print(f"backend={info['backend']} device={info['device']} layers={cfg.num_layers} hidden={cfg.hidden_size} "
          f"seq_block={cfg.seq_block} ssd_chunk_group={cfg.ssd_chunk_group} prompt=frames x {tokens_per_frame} "
          f"+ {text} text, batch 1; sizes in {unit}; fits = params + temp + out <= {FIT_GIB:g} GiB")
    print(HEADER, flush=True)
    rows, t0 = [], time.perf_counter()
    for n in frames:
        for budget in ([None, F.budget] if F.budget else [None]):
            row = analyse(cfg, frames=n, tokens_per_frame=tokens_per_frame, text=text, budget=budget)
            rows.append(row)
            print(format_row(row, unit), flush=True)
    wall = time.perf_counter() - t0
    plan = f"; plan = reduction.progressive(num_layers, num_visual, {F.budget:g}) (step)" if F.budget else ""
    print(f"wall time {wall:.1f}s{plan}")
    if F.json:
        atomic.write_json(F.json, dict(machine=info, config=cfg.to_dict(), tokens_per_frame=tokens_per_frame,
                                       text=text, analysis=f"XLA {info['backend']} compiler memory_analysis()",
                                       wall_seconds=wall, rows=rows), default=float)


if __name__ == "__main__":
    cli.run(main, define_flags)
