"""Multiple-choice video QA accuracy under token reduction, with prefill times, in one jitted run.

    python -m eval.videoqa --checkpoint NAME_OR_DIR --data synth:test --json OUT.json --plot OUT.png
    python -m eval.videoqa --checkpoint DIR --data synth:test --num_examples 256 --frames 16,32,64 \\
        --plans full,progressive,fastv,pyramid,uniform,random --budgets 0.25,0.35,0.5 \\
        [--evs 0.5] [--mamba_mode decay_free,decay] --json out.json --plot out.png
    python -m eval.videoqa --checkpoint HF_DIR --data videomme:/data/videomme --frames 64 --fps 1 --json out.json

--data:
  synth:SPLIT   SynthVideoQA generated on the fly (SPLIT: train, validation or test) from
                --seed, --num_examples videos of --frames frames (several values are taken in
                turn), at the model's frame size
  synth:DIR     a split prepared by `python -m hybridvlm.data.prepare_synth` (--split)
  jsonl:FILE    the local JSONL format (`hybridvlm.data.jsonl`)
  KIND:DIR      a benchmark reader: videomme, longvideobench, lvbench, mlvu

Each (frame bucket, plan) is one `jax.jit` program, compiled ahead of the bucket's first
batch and reused (the vision tower + EVS is one more per bucket and EVS rate); every batch
is answered by every variant, so accuracies are paired and times are measured side by side.
The answer is the option letter with the highest logit at the prompt's last position; as a
check, --greedy_batches batches per bucket are also greedy-decoded (one token).

Output (JSON; --plot adds accuracy against the achieved budget, one line per plan): per
variant (plan, budget, Mamba score mode, EVS rate) the accuracy overall and per task, the
examples, the achieved budget (kept share of visual token-layers, EVS included), the LM
prefill time and the time to first token (vision + prefill) per batch, their speedups
against `full` in the same run, the share of the question's answering frames that keep at
least one visual token to the last layer (SynthVideoQA), and the greedy check. Inputs are
checked before the model is built; an error prints one line (`--debug` for the traceback).
"""

from __future__ import annotations

import time

from absl import flags

from eval import inputs
from eval.qa_harness import open_records, run_videoqa
from eval.qa_variants import FULL, PLAN_NAMES, build_variants
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.data import synth
from hybridvlm.data.readers import BENCHMARKS
from hybridvlm.shipped import resolve_checkpoint
from hybridvlm.vlm import NemotronHVLModel
from reduction.scores import MAMBA_MODES

DATA_KINDS = ("synth",) + tuple(BENCHMARKS)


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "A shipped model's name (e.g. synth-video-qa-tiny) or an HF / hybridvlm "
                                            "VLM checkpoint directory.")
    flags.DEFINE_string("data", "synth:test", "synth:SPLIT, synth:DIR, jsonl:FILE or BENCHMARK:DIR (see --help).")
    flags.DEFINE_string("split", "test", "The split of a prepared synth:DIR.")
    flags.DEFINE_integer("seed", 0, "Base seed of generated SynthVideoQA (synth:SPLIT).", lower_bound=0)
    flags.DEFINE_integer("num_examples", None, "Examples to evaluate (default: 256 generated, or the whole file).",
                         lower_bound=1)
    flags.DEFINE_string("frames", "32", "Frames per video: generated SynthVideoQA lengths (comma separated, taken in "
                                        "turn), or the most sampled from a video file.")
    flags.DEFINE_float("fps", None, "Frames per second sampled from video files (default: --frames spread "
                                    "uniformly); generated clips are 2 fps.")
    flags.DEFINE_string("buckets", None, "Frame buckets, comma separated (default: the --frames values).")
    flags.DEFINE_integer("batch_size", 8, "Rows per batch.", lower_bound=1)
    flags.DEFINE_string("plans", "full,progressive,fastv,pyramid,uniform,random",
                        f"Comma separated, among {', '.join(PLAN_NAMES)} (full is always run: the reference).")
    flags.DEFINE_string("budgets", "0.25,0.35,0.5", "Kept share of visual token-layers, comma separated.")
    flags.DEFINE_string("mamba_mode", "decay_free", f"Mamba score modes, comma separated: {', '.join(MAMBA_MODES)}.")
    flags.DEFINE_string("evs", None, "EVS rates (share of visual tokens EVS drops before the LM), comma separated; "
                                     "each variant then also runs with each rate.")
    flags.DEFINE_integer("greedy_batches", 1, "Batches per bucket also answered by greedy decoding.", lower_bound=0)
    flags.DEFINE_string("json", None, "Path of the JSON report (required).")
    flags.DEFINE_string("plot", None, "Path of a PNG: accuracy against achieved budget, one line per plan.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")


# ----------------------------------------------------------------------------- checks


def _list(text: str | None, flag: str, kind=str) -> list:
    items = [s.strip() for s in str(text or "").split(",") if s.strip()]
    try:
        return [kind(s) for s in items]
    except ValueError:
        raise cli.UsageError(f"{flag}={text!r}: expected comma-separated {kind.__name__} values") from None


def parse_args(f) -> dict:
    """The run's settings from the flags, checked before any model is built (UsageError /
    InputError naming the flag)."""
    if not f.checkpoint:
        raise cli.UsageError("--checkpoint: required (a shipped model's name or a checkpoint directory)")
    if not f.json:
        raise cli.UsageError("--json: required (the report's path)")
    cli_checks.output_file("--json", f.json)
    if f.plot:
        cli_checks.output_file("--plot", f.plot)
        cli_checks.require(f.plot.lower().endswith(".png"), "--plot", f"{f.plot}: give a .png path")
    frames = _list(f.frames, "--frames", int)
    cli_checks.require(bool(frames), "--frames", "needs at least one value")
    for n in frames:
        cli_checks.at_least("--frames", n, 1)
    buckets = sorted(set(_list(f.buckets, "--buckets", int) if f.buckets else frames))
    cli_checks.require(max(frames) <= max(buckets), "--buckets",
                       f"the largest bucket ({max(buckets)}) is shorter than --frames={max(frames)}")
    if f.fps is not None:
        cli_checks.require(f.fps > 0, "--fps", f"must be > 0, got {f.fps}")
    kind = f.data.partition(":")[0].strip().lower()
    cli_checks.require(kind in DATA_KINDS and ":" in f.data, "--data",
                       f"{f.data!r}: give synth:SPLIT, synth:DIR, jsonl:FILE or BENCHMARK:DIR "
                       f"(kinds: {', '.join(DATA_KINDS)})")
    if kind == "synth" and f.data.partition(":")[2] in synth.SPLITS:
        for n in frames:
            cli_checks.in_range("--frames", n, synth.MIN_FRAMES, synth.MAX_FRAMES)
    plans = _list(f.plans, "--plans")
    budgets = _list(f.budgets, "--budgets", float)
    modes = _list(f.mamba_mode, "--mamba_mode")
    rates = [0.0] + [r for r in _list(f.evs, "--evs", float) if r != 0.0]
    if FULL not in plans:
        plans = [FULL] + plans
    try:
        variants = build_variants(plans, budgets, mamba_modes=modes or ["decay_free"], evs=rates)
    except ValueError as e:
        flag = ("--plans" if "plan" in str(e) else "--mamba_mode" if "Mamba" in str(e)
                else "--evs" if "EVS" in str(e) else "--budgets")
        raise cli.UsageError(f"{flag}: {e}") from None
    # The model source last, once every flag value has passed.
    try:
        checkpoint = resolve_checkpoint(f.checkpoint, flag="--checkpoint")
    except FileNotFoundError as e:
        raise cli.InputError(str(e)) from None
    if not inputs.check_model_source(None, checkpoint):
        raise cli.UsageError(f"--checkpoint: {checkpoint} is a text-only language model; video QA needs a VLM")
    return dict(checkpoint=checkpoint, frames=frames, buckets=buckets, variants=variants)


# ----------------------------------------------------------------------------- outputs


def plot(report: dict, path: str) -> None:
    """Accuracy against the achieved budget, one line per (plan, Mamba mode, EVS rate);
    `full` as a dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines: dict[str, list] = {}
    for row in report["results"]:
        if row["accuracy"] is None:
            continue
        if row["plan"] == FULL:
            ax.axhline(row["accuracy"], ls="--", color="k" if not row["evs"] else "tab:gray",
                       label=row["variant"])
            continue
        key = row["variant"].split("@")[0] + "".join(
            s for s in (f"/{row['mamba_mode']}" if row["mamba_mode"] not in (None, "decay_free") else "",
                        f"+evs{row['evs']:g}" if row["evs"] else ""))
        lines.setdefault(key, []).append((row["achieved_budget"], row["accuracy"]))
    for key, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax.set_xlabel("kept share of visual token-layers (achieved budget)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{report['model']} on {report['data']} ({report['examples']} questions)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def summary_lines(report: dict) -> list[str]:
    """A short table for the terminal."""
    out = [f"{'variant':<28} {'acc':>6} {'budget':>7} {'prefill':>9} {'speedup':>8} {'frames':>7}"]
    for r in report["results"]:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        bud = "-" if r["achieved_budget"] is None else f"{r['achieved_budget']:.3f}"
        pre = "-" if r["prefill_s"] is None else f"{r['prefill_s'] * 1e3:.1f}ms"
        spd = f"{r['prefill_speedup']:.2f}x" if r.get("prefill_speedup") else "-"
        fr = "-" if r["answer_frames_kept"] is None else f"{r['answer_frames_kept']:.2f}"
        out.append(f"{r['variant']:<28} {acc:>6} {bud:>7} {pre:>9} {spd:>8} {fr:>7}")
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    args = parse_args(f)
    t0 = time.perf_counter()
    model, tok, label = inputs.load_model(None, args["checkpoint"])
    if not isinstance(model, NemotronHVLModel):
        raise cli.UsageError(f"--checkpoint: {args['checkpoint']} is a text-only language model")
    side = model.config.image_size or inputs.DEFAULT_IMAGE_SIZE
    try:
        records = open_records(f.data, seed=f.seed, num_examples=f.num_examples, frames=args["frames"],
                               frame_size=side, split=f.split)
    except (ValueError, FileNotFoundError) as e:
        raise cli.InputError(f"--data: {e}" if not str(e).startswith("--data") else str(e)) from None
    if len(records) == 0:
        raise cli.InputError(f"--data: {f.data}: no questions to evaluate")
    try:
        report = run_videoqa(model, tok, records, args["variants"], batch_size=f.batch_size, buckets=args["buckets"],
                             fps=f.fps, greedy_batches=f.greedy_batches, progress=f.progress)
    except ValueError as e:  # an impossible plan for a bucket, named
        raise cli.UsageError(str(e)) from None
    report = dict(model=label, data=f.data, seed=f.seed, frames=args["frames"], **report,
                  elapsed_s=round(time.perf_counter() - t0, 1))
    atomic.write_json(f.json, report)
    if f.plot:
        plot(report, f.plot)
    print("\n".join(summary_lines(report)))
    print(f"wrote {f.json}" + (f" and {f.plot}" if f.plot else ""))


if __name__ == "__main__":
    cli.run(main, define_flags)
