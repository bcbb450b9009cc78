"""Layerwise sparsity and importance stability of visual-token scores.

    python -m eval.analyze                                   # tiny random VLM, 3 generated clips
    python -m eval.analyze --help                            # flags and config fields
    python -m eval.analyze --checkpoint DIR --video a.mp4 --video b.mp4 --question "..." --out results/
    python -m eval.analyze --num_examples 5 --config.max_frames=8 --json out/analysis.json
    python -m eval.analyze --checkpoint DIR --data synth:test --num_examples 16 --config.max_frames=32

For each example (a video and the question), the LM runs WITHOUT pruning and
the language-aware score of every visual token is recorded before every layer
(`NemotronHForCausalLM.layerwise_visual_scores`; an MLP layer is scored with
the next mixer's projections). Then, per layer, the fraction of visual tokens
holding `--mass` (90%) of the score mass (layerwise sparsity), and between
every pair of layers the Spearman correlation and the top-`--topk_frac` (25%)
overlap of the scores (importance stability), averaged over the examples.

Outputs, in --out (default: a new temporary directory, printed at the start
and the end; --json PATH moves the JSON, and then --out defaults to PATH's
directory):
  analysis.json      model, examples, score config, per-layer table, LxL matrices,
                     per-layer-kind summaries (see `reduction.analysis.summarize`);
  sparsity.png       sparsity over depth (mean +- std), attention / Mamba / MLP marked;
  spearman.png       LxL Spearman heatmap;   overlap.png   LxL top-k overlap heatmap;
  scores_<ex>.png    layer x visual-token heatmap of each example (each layer's
                     share of its score mass; dotted lines at tubelet boundaries);
  scores.npz         the raw (L, V) scores per example, with --save_scores.
Files are written to a temporary name and renamed. Videos, the checkpoint,
the output paths and the numbers are checked before the model is built; an
error prints one line (`--debug` for the traceback).

With no --checkpoint the model is the tiny **randomly initialised, untrained**
VLM of configs/tiny_vlm.py (labelled so in the output): the numbers only show
the pipeline working, they say nothing about the paper's claims. Examples
without --video are procedurally generated clips (hybridvlm.video.write_test_clip)
of different lengths, frame rates and sizes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

import configs
from eval import inputs
from eval.qa_harness import open_records
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.cache import Layout
from hybridvlm.data.pipeline import PipelineConfig
from hybridvlm.data.pipeline_example import PrepareExample, Skipped
from hybridvlm.data.records import LETTERS
from hybridvlm.video import write_test_clip
from hybridvlm.vlm import NemotronHVLModel
from reduction import analysis
from reduction.scores import MAMBA_MODES, ScoreConfig

UNTRAINED_LABEL = "tiny random VLM (UNTRAINED: the scores are not meaningful)"
KIND_STYLE = {"*": ("attention", "tab:red", "*"), "M": ("Mamba", "tab:blue", "o"), "-": ("MLP", "tab:gray", "."),
              "E": ("MoE", "tab:green", "s")}
JSON_NAME = "analysis.json"


def define_flags() -> None:
    """Registers the CLI flags (called by __main__ only, so importing this module
    next to eval.demo, which defines flags of the same names, is fine)."""
    config_flags.DEFINE_config_file("config", configs.path("tiny_vlm"), "ml_collections config file.")
    flags.DEFINE_string("checkpoint", None, "HF or hybridvlm VLM checkpoint directory (default: tiny random VLM).")
    flags.DEFINE_multi_string("video", None, "Video file; repeat for several examples (default: generated clips).")
    flags.DEFINE_integer("num_examples", 3, "Generated clips when no --video is given (or questions of --data).",
                         lower_bound=1)
    flags.DEFINE_string("data", None, "Questions with their videos instead of --video/--question: synth:SPLIT "
                                      "(SynthVideoQA generated from --seed, config.max_frames frames), synth:DIR, "
                                      "jsonl:FILE or BENCHMARK:DIR (as eval.videoqa).")
    flags.DEFINE_integer("seed", 0, "Base seed of generated SynthVideoQA (--data synth:SPLIT).", lower_bound=0)
    flags.DEFINE_string("question", None, "Question about the video (default: the config's).")
    flags.DEFINE_string("out", None, "Output directory (default: --json's directory, else a new temporary "
                        "directory, printed).")
    flags.DEFINE_string("json", None, f"Path of the JSON output (default: OUT/{JSON_NAME}).")
    flags.DEFINE_float("mass", 0.9, "Score mass for the layerwise sparsity.")
    flags.DEFINE_float("topk_frac", 0.25, "Top fraction of visual tokens for the overlap.")
    flags.DEFINE_enum("mamba_mode", ScoreConfig.mamba_mode, list(MAMBA_MODES), "Mamba score: decay_free or decay.")
    flags.DEFINE_integer("max_query", ScoreConfig.max_query, "Static bound on the question rows scored.",
                         lower_bound=1)
    flags.DEFINE_boolean("save_scores", False, "Also write the raw scores as scores.npz.")


# ----------------------------------------------------------------------------- inputs


def check_args(cfg, *, checkpoint=None, videos=None, num_examples=3, out_dir=None, json_path=None, mass=0.9,
               topk_frac=0.25, data=None) -> None:
    """Checks the inputs without building the model: UsageError / cli.InputError naming the flag."""
    inputs.check_generation_config(cfg)
    if data is not None and videos:
        raise cli.UsageError("--data, --video: give one of them, not both")
    cli_checks.in_range("--mass", mass, 0.0, 1.0, low_open=True)
    cli_checks.in_range("--topk_frac", topk_frac, 0.0, 1.0, low_open=True)
    if not videos:
        cli_checks.at_least("--num_examples", num_examples, 1)
    if not inputs.check_model_source(cfg, checkpoint):
        raise cli.UsageError(f"--checkpoint: {checkpoint} is a text-only language model; the analysis needs a VLM")
    for video in videos or ():
        cli_checks.media_file("--video", video)
    if out_dir is not None:
        cli_checks.output_dir("--out", out_dir)
    if json_path is not None:
        cli_checks.output_file("--json", json_path)


def output_paths(out_dir: str | None, json_path: str | None) -> tuple[str, str]:
    """(output directory, JSON path). Default directory: --json's, else a new temporary one
    (never the working tree, which is usually the source checkout)."""
    if out_dir is None:
        out_dir = (os.path.dirname(os.path.abspath(json_path)) if json_path
                   else tempfile.mkdtemp(prefix="hybridvlm-analysis-"))
    return out_dir, json_path or os.path.join(out_dir, JSON_NAME)


def load_model(cfg, checkpoint):
    """Returns (VLM, tokenizer, label, untrained)."""
    model, tok, label = inputs.load_model(cfg, checkpoint)
    if not isinstance(model, NemotronHVLModel):
        raise cli.UsageError(f"--checkpoint: {checkpoint} is a text-only language model; the analysis needs a VLM")
    untrained = checkpoint is None
    return model, tok, UNTRAINED_LABEL if untrained else label, untrained


def clip_params(i: int) -> dict:
    """write_test_clip parameters of generated example i (differs per example)."""
    return dict(num_frames=32 + 12 * i, fps=8 + 4 * (i % 3), height=128 + 16 * (i % 2), width=160 + 32 * (i % 3))


def example_input(model: NemotronHVLModel, tok, cfg, video: str, question: str):
    """-> (token ids list, tubelets (T, 6, S, S) float32, info)."""
    text, tubelets, info = inputs.video_inputs(model, tok, cfg, video, question)
    ids = inputs.encode(model, tok, text)
    vc = model.config
    info.update(tubelets=int(tubelets.shape[1]), tokens_per_tubelet=vc.tokens_per_tubelet(*tubelets.shape[-2:]),
                prompt_tokens=len(ids), visual_tokens=int(sum(t == vc.image_token_id for t in ids)))
    return ids, np.asarray(tubelets[0], np.float32), info


def _names(videos, generated: bool) -> list[str]:
    names = []
    for i, v in enumerate(videos):
        base = f"clip{i}" if generated else re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.splitext(os.path.basename(v))[0])
        name, n = base or f"video{i}", 1
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


# ----------------------------------------------------------------------------- scoring


def score_examples(model: NemotronHVLModel, examples, score_cfg: ScoreConfig) -> list[np.ndarray]:
    """examples: [(ids, tubelets, info)] -> per example (L, V) float32 scores.

    Examples with the same tubelet shape are batched (left padding to the
    longest prompt), so the default run compiles once.
    """
    lm = model.language_model
    pad = lm.config.pad_token_id if lm.config.pad_token_id is not None else 0
    image_id = model.config.image_token_id
    if pad == image_id:
        raise ValueError("pad_token_id equals image_token_id; cannot left-pad the prompts")
    graphdef, state = nnx.split(model)

    @jax.jit(static_argnums=(4,))
    def run(state, ids, mask, pixels, num_visual):
        m = nnx.merge(graphdef, state)
        h = m.embed(ids, pixels)
        visual = (ids == image_id) & mask.astype(bool)
        return m.language_model.layerwise_visual_scores(h, Layout.prompt(mask), visual, score_cfg,
                                                        num_visual=num_visual)

    groups: dict[tuple, list[int]] = {}
    for i, (_, tub, _) in enumerate(examples):
        groups.setdefault(tub.shape, []).append(i)
    out: list[np.ndarray | None] = [None] * len(examples)
    for idx in groups.values():
        t = max(len(examples[i][0]) for i in idx)
        ids = np.full((len(idx), t), pad, np.int32)
        mask = np.zeros((len(idx), t), np.int32)
        for r, i in enumerate(idx):
            row = examples[i][0]
            ids[r, t - len(row):], mask[r, t - len(row):] = row, 1
        counts = set((ids == image_id).sum(1).tolist())
        if len(counts) != 1:
            raise ValueError(f"examples with equal video shapes have different visual token counts {counts}")
        pixels = np.stack([examples[i][1] for i in idx])  # (b, T, 6, S, S): one video per row
        model.check_inputs(ids, pixel_values_videos=pixels)
        s = np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels), counts.pop()))
        for r, i in enumerate(idx):
            out[i] = s[:, r]
    return out


# ----------------------------------------------------------------------------- outputs


def _savefig(fig, path):
    import matplotlib.pyplot as plt

    atomic.write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def _kind_ticks(ax, kinds, axis="both"):
    labels = [f"{i}{k}" for i, k in enumerate(kinds)]
    step = max(1, len(kinds) // 32)
    ticks = list(range(0, len(kinds), step))
    if axis in ("both", "x"):
        ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=7)
    if axis in ("both", "y"):
        ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=7)


def plot_sparsity(summary, title, path):
    import matplotlib.pyplot as plt

    kinds = summary["kinds"]
    x = np.arange(len(kinds))
    mean = np.array([np.nan if v is None else v for v in summary["sparsity"]["mean"]])
    std = np.array([np.nan if v is None else v for v in summary["sparsity"]["std"]])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(kinds)), 3.6))
    ax.plot(x, mean, color="black", lw=1)
    ax.fill_between(x, mean - std, mean + std, color="black", alpha=0.12, lw=0)
    for k, (name, color, marker) in KIND_STYLE.items():
        sel = [i for i, c in enumerate(kinds) if c == k]
        if sel:
            ax.scatter(x[sel], mean[sel], color=color, marker=marker, s=60 if k == "*" else 25, zorder=3, label=name)
            if k == "*":
                for i in sel:
                    ax.axvline(i, color=color, alpha=0.15, lw=3)
    ax.set_xlabel("layer (scores entering the layer)")
    ax.set_ylabel(f"fraction of visual tokens\nholding {summary['mass']:.0%} of the score mass")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    _kind_ticks(ax, kinds, "x")
    _savefig(fig, path)


def plot_matrix(matrix, kinds, title, label, path, vmin, vmax, cmap):
    import matplotlib.pyplot as plt

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], np.float64)
    side = max(4.5, 0.16 * len(kinds))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(m, vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=label, fraction=0.046)
    _kind_ticks(ax, kinds)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    _savefig(fig, path)


def plot_scores(scores, kinds, per_tubelet, title, path):
    import matplotlib.pyplot as plt

    s = np.abs(np.asarray(scores, np.float64))
    total = s.sum(1, keepdims=True)
    share = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    L, V = s.shape
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, V / 24)), max(2.5, 0.2 * L + 1.2)))
    im = ax.imshow(share, aspect="auto", cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="share of the layer's score mass", fraction=0.03)
    if per_tubelet and V // per_tubelet <= 64:
        for b in range(per_tubelet, V, per_tubelet):
            ax.axvline(b - 0.5, color="white", lw=0.5, ls=":", alpha=0.6)
    _kind_ticks(ax, kinds, "y")
    ax.set_xlabel("visual token (sequence order)")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    _savefig(fig, path)


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def print_table(result) -> None:
    print(f"model    : {result['model']}")
    ex = result["examples"]
    print(f"examples : {len(ex)} ({', '.join(e['name'] for e in ex)}), visual tokens "
          f"{'/'.join(str(v) for v in dict.fromkeys(e['visual_tokens'] for e in ex))}")
    print(f"scores   : {result['score_config']}")
    m, f = result["mass"], result["topk_frac"]
    head = f"{'layer':>5} {'kind':>9} {f'sparsity@{m:.0%}':>13} {'spearman(next)':>15} {f'top{f:.0%}(last)':>13}"
    print(head)
    print("-" * len(head))
    for row in result["layers"]:
        name = KIND_STYLE.get(row["kind"], (row["kind"],))[0]
        sp = _fmt(row["sparsity_mean"])
        if row["sparsity_std"]:
            sp += f"±{row['sparsity_std']:.2f}"
        print(f"{row['layer']:>5} {name:>9} {sp:>13} {_fmt(row['spearman_next']):>15} {_fmt(row['overlap_last']):>13}")


# ----------------------------------------------------------------------------- driver


def data_examples(model: NemotronHVLModel, tok, cfg, data: str, *, seed: int, num_examples: int):
    """[(ids, tubelets (T, 6, S, S), info)] of the first `num_examples` questions of a data
    spec (`eval.videoqa`'s), each with its own question and options after its video."""
    vc = model.config
    side = vc.image_size or inputs.DEFAULT_IMAGE_SIZE
    tp = vc.temporal_patch_size
    bucket = -(-cfg.max_frames // tp) * tp
    try:
        records = open_records(data, seed=seed, num_examples=num_examples, frames=[cfg.max_frames], frame_size=side)
    except (ValueError, FileNotFoundError) as e:
        raise cli.InputError(str(e) if str(e).startswith("--data") else f"--data: {e}") from None
    pcfg = PipelineConfig.for_model(vc, batch_size=1, buckets=(bucket,), max_frames=cfg.max_frames, fps=cfg.fps)
    prep = PrepareExample(pcfg, tok, train=False)
    out = []
    for record in records:
        ex = prep(record)
        if isinstance(ex, Skipped):
            raise cli.InputError(f"--data: {data}: {ex.uid}: {ex.reason}")
        ids = ex.ids.tolist()
        letter = LETTERS[ex.answer] if ex.answer >= 0 else None
        info = dict(name=re.sub(r"[^A-Za-z0-9_.-]+", "_", record.uid), uid=record.uid, task=record.task,
                    question=record.question, answer=letter, frames=ex.num_frames,
                    timestamps=[round(float(t), 3) for t in ex.timestamps], tubelets=int(ex.tubelets.shape[0]),
                    tokens_per_tubelet=pcfg.tokens_per_tubelet, prompt_tokens=len(ids),
                    visual_tokens=int(sum(t == vc.image_token_id for t in ids)))
        out.append((ids, np.asarray(ex.tubelets, np.float32), info))
    return out


def run(cfg, *, checkpoint=None, videos=None, num_examples=3, question=None, out_dir=None, json_path=None,
        mass=0.9, topk_frac=0.25, score_cfg: ScoreConfig | None = None, save_scores=False, verbose=True,
        data: str | None = None, seed: int = 0) -> dict:
    """Runs the analysis and writes the outputs; returns the JSON dict."""
    import matplotlib

    matplotlib.use("Agg")
    t0 = time.perf_counter()
    score_cfg = score_cfg or ScoreConfig()
    check_args(cfg, checkpoint=checkpoint, videos=videos, num_examples=num_examples, out_dir=out_dir,
               json_path=json_path, mass=mass, topk_frac=topk_frac, data=data)
    out_dir, json_path = output_paths(out_dir, json_path)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    if verbose:
        print(f"output   : {out_dir}", flush=True)

    model, tok, label, untrained = load_model(cfg, checkpoint)
    question = cfg.question if question is None else question
    generated = not videos and data is None
    examples, infos = [], []
    if data is not None:
        examples = data_examples(model, tok, cfg, data, seed=seed, num_examples=num_examples)
        infos = [info for _, _, info in examples]
        question = "(each example's own)"
    with tempfile.TemporaryDirectory() as tmp:
        if data is not None:
            videos = []
        elif generated:
            videos = []
            for i in range(num_examples):
                path = os.path.join(tmp, f"clip{i}.mp4")
                write_test_clip(path, **clip_params(i))
                videos.append(path)
        names = _names(videos, generated)
        for i, (name, video) in enumerate(zip(names, videos)):
            ids, tub, info = example_input(model, tok, cfg, video, question)
            info = dict(name=name, **info)
            if generated:
                info["video"] = None
                info["generated_clip"] = clip_params(i)
            if info["visual_tokens"] == 0:
                raise cli.InputError(f"--video: {video}: the prompt has no visual tokens")
            examples.append((ids, tub, info))
            infos.append(info)
    t_inputs = time.perf_counter() - t0
    per_example = score_examples(model, examples, score_cfg)
    t_scores = time.perf_counter() - t0 - t_inputs

    # Group equal V together for the statistics (each (L, b_i, V_i)).
    by_v: dict[int, list[np.ndarray]] = {}
    for s in per_example:
        by_v.setdefault(s.shape[1], []).append(s)
    groups = [np.stack(g, axis=1) for g in by_v.values()]
    kinds = model.text_config.pattern
    summary = analysis.summarize(groups, kinds, mass=mass, frac=topk_frac)

    tag = " [UNTRAINED random weights]" if untrained else ""
    title = f"{os.path.basename(str(label)) if not untrained else 'tiny random VLM'}{tag}, {len(examples)} example(s)"
    files = dict(json=json_path, sparsity=os.path.join(out_dir, "sparsity.png"),
                 spearman=os.path.join(out_dir, "spearman.png"), overlap=os.path.join(out_dir, "overlap.png"),
                 scores={})
    plot_sparsity(summary, f"Layerwise sparsity: {title}", files["sparsity"])
    plot_matrix(summary["spearman"], kinds, f"Spearman of visual-token scores between layers\n{title}",
                "Spearman rank correlation", files["spearman"], -1.0, 1.0, "RdBu_r")
    plot_matrix(summary["overlap"], kinds, f"Top-{topk_frac:.0%} overlap between layers\n{title}",
                f"|top-{topk_frac:.0%} ∩| / k", files["overlap"], 0.0, 1.0, "viridis")
    for info, s in zip(infos, per_example):
        path = os.path.join(out_dir, f"scores_{info['name']}.png")
        plot_scores(s, kinds, info["tokens_per_tubelet"], f"{info['name']}: visual-token scores by layer{tag}", path)
        files["scores"][info["name"]] = path
    if save_scores:
        files["raw_scores"] = os.path.join(out_dir, "scores.npz")
        arrays = {i["name"]: s for i, s in zip(infos, per_example)}

        def save_npz(tmp):
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
                np.savez(f, **arrays)

        atomic.write_atomic(files["raw_scores"], save_npz)

    result = dict(
        model=label, untrained=untrained, backend=jax.default_backend(), question=question,
        score_config=dataclasses.asdict(score_cfg), pattern=kinds, examples=infos, **summary, files=files,
        timing_s=dict(inputs=t_inputs, scores_incl_compile=t_scores, total=time.perf_counter() - t0),
    )
    atomic.write_json(json_path, result, allow_nan=False)
    if verbose:
        print_table(result)
        print(f"wrote    : {json_path}, {out_dir}/*.png ({result['timing_s']['total']:.1f} s)")
    return result


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    score_cfg = ScoreConfig(mamba_mode=F.mamba_mode, max_query=F.max_query)
    run(F.config, checkpoint=F.checkpoint, videos=F.video, num_examples=F.num_examples, question=F.question,
        out_dir=F.out, json_path=F.json, mass=F.mass, topk_frac=F.topk_frac, score_cfg=score_cfg,
        save_scores=F.save_scores, data=F.data, seed=F.seed)


if __name__ == "__main__":
    cli.run(main, define_flags)
