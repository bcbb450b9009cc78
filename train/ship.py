"""Package a finished finetuning run as a model shipped inside hybridvlm, with its model card.

    python -m train.ship --workdir RUN --report videoqa.json --name synth-video-qa-tiny

Writes `hybridvlm/pretrained/NAME/` (or `--out DIR/NAME`), whole or not at all:
    config.json, model.safetensors   the model as an HF directory (`export_hf`, float32), so both
                                     `hybridvlm.from_pretrained(NAME)` and transformers load it
    tokenizer.json                   the run's tokenizer
    training.json                    the config of every training stage, oldest first
    metrics.jsonl                    the last stage's metrics log
    videoqa.json                     the `eval.videoqa` report given with --report (optional)
    MODEL_CARD.md                    what it is, the exact commands that reproduce it (each stage's
                                     overrides of --base_config), the training curve's end points
                                     and the test accuracy table
A run started from another run's model (`init`) is a stage of a chain; the card lists every
stage's command, following `init` back through each model's training.json.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import tempfile

from absl import flags

import configs
from hybridvlm import cli, cli_checks
from hybridvlm.hf_export import export_hf
from hybridvlm.loading import from_pretrained
from hybridvlm.shipped import PRETRAINED_DIR
from hybridvlm.tokenizer import TOKENIZER_FILE
from train.finetune import MODEL_DIR, flat_config
from train.metrics import METRICS_FILE, read_metrics
from train.model import TRAINING_FILE

MAX_BYTES = 30 * 2**20  # the limit for a model inside the package
# Flags of train.pretrain_vision that its training.json records beside the config.
PRETRAIN_FLAGS = ("batch_size", "learning_rate")


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The finished run (its model/, config.json, metrics.jsonl).")
    flags.DEFINE_string("name", "synth-video-qa-tiny", "The shipped model's name.")
    flags.DEFINE_string("out", PRETRAINED_DIR, "Directory receiving NAME/.")
    flags.DEFINE_string("report", None, "An eval.videoqa JSON report of the model on the test split.")
    flags.DEFINE_string("base_config", configs.path("synth_video_qa_tiny"), "The config file the training "
                        "commands are written against (their --config.* flags are the differences).")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing NAME/.")


def stages(model_dir: str) -> list[dict]:
    """[{"model": dir, "step": n, "config": {...}}], oldest first, following `init` back."""
    chain, seen = [], set()
    while model_dir and model_dir not in seen:
        seen.add(model_dir)
        path = os.path.join(model_dir, TRAINING_FILE)
        if not os.path.isfile(path):
            break
        with open(path) as f:
            t = json.load(f)
        # A pretrain_vision stage also records its own flags (batch_size, learning_rate).
        chain.append(dict(model=model_dir, step=int(t["step"]), config=t["config"],
                          stage=t.get("stage", "finetune"),
                          flags={k: t[k] for k in PRETRAIN_FLAGS if k in t}))
        model_dir = t["config"].get("init")
    return chain[::-1]


def command(config: dict, base: dict, base_path: str, workdir: str, init: str | None, *,
            stage: str = "finetune", stage_flags: dict | None = None, step: int | None = None) -> str:
    """The command that reproduces one stage from the base config file: `train.finetune`
    with the config's differences, or `train.pretrain_vision` with its own flags (the
    config's `steps` is finetune's; a pretraining stage's length is its `step`)."""
    # Compared as JSON: training.json stores the config's tuples as lists.
    new, old = (flat_config(json.loads(json.dumps(c))) for c in (config, base))
    skip = {"init"} | ({"steps"} if stage == "pretrain_vision" else set())
    args = [f"--config.{k}={json.dumps(v) if not isinstance(v, str) else v}"
            for k, v in sorted(new.items()) if k not in skip and old.get(k) != v]
    if stage == "pretrain_vision":
        own = dict(steps=step, **(stage_flags or {}))
        args = [f"--{k} {v}" for k, v in own.items() if v is not None] + args
    elif init:
        args.insert(0, f"--config.init={init}")
    return " ".join([f"python -m train.{stage} --config {base_path}", f"--workdir {workdir}", *args])


def reproduce(chain: list[dict], base: dict, base_path: str) -> list[str]:
    """One command per stage of `chain` (`stages`), stage i in runs/stage{i}, each starting
    from the previous stage's model."""
    return [command(st["config"], base, base_path, f"runs/stage{i + 1}", f"runs/stage{i}/{MODEL_DIR}" if i else None,
                    stage=st["stage"], stage_flags=st["flags"], step=st["step"]) for i, st in enumerate(chain)]


def _params(model) -> dict[str, int]:
    import jax
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    count = lambda s: int(sum(x.size for x in jax.tree.leaves(s)))
    return dict(vision=count(state["vision"]), projector=count(state["projector"]),
                language_model=count(state["language_model"]), total=count(state))


def model_card(name: str, model, chain: list[dict], base: dict, base_path: str, metrics: list[dict],
               report: dict | None) -> str:
    vc = model.config
    p = _params(model)
    tools = " and ".join(f"`python -m train.{t}`" for t in sorted({st["stage"] for st in chain}, reverse=True))
    lines = [f"# {name}", "",
             "A small hybrid video VLM of this project's architecture (RADIO-style ViT, pixel shuffle, projector, "
             "Nemotron-H LM interleaving Mamba-2, attention and MLP layers), trained from scratch on SynthVideoQA "
             f"on a 2-core CPU with {tools}.", "",
             "## Model", "",
             f"- LM: pattern `{vc.text.pattern}`, hidden {vc.text.hidden_size}, vocabulary {vc.text.vocab_size} "
             f"(`synth` tokenizer); {p['language_model']:,} parameters",
             f"- vision tower: {vc.vision.num_layers} blocks, width {vc.vision.hidden_size}, patch "
             f"{vc.vision.patch_size}, {vc.image_size}x{vc.image_size} frames, tubelets of "
             f"{vc.temporal_patch_size} frames, {vc.tokens_per_tubelet(vc.image_size, vc.image_size)} visual tokens "
             f"per tubelet; {p['vision']:,} parameters; projector {p['projector']:,}",
             f"- {p['total']:,} parameters in all, stored as float32 safetensors", "",
             "## Reproduce", "",
             "```text"]
    lines += reproduce(chain, base, base_path)
    lines += [f"python -m train.ship --workdir runs/stage{len(chain)} --report videoqa.json --name {name}", "```",
              "", "## Training", ""]
    for i, st in enumerate(chain):
        c = st["config"]
        if st["stage"] == "pretrain_vision":
            lines.append(f"- stage {i + 1}: perception pretraining of the tower (`train.pretrain_vision`), "
                         f"{st['step']} steps, batch {st['flags'].get('batch_size')}, learning rate "
                         f"{st['flags'].get('learning_rate')}")
            continue
        lines.append(f"- stage {i + 1}: {st['step']} steps, batch {c['batch_size']}, frames {c['data']['frames']}, "
                     f"learning rate {c['optim']['learning_rate']}, reduction "
                     f"{c['reduction']['shape'] or 'none'}{'' if not c['reduction']['budget'] else ' @ ' + str(c['reduction']['budget'])}")
    train_rows = [r for r in metrics if "loss" in r]
    eval_rows = [r for r in metrics if "eval_accuracy" in r]
    if train_rows:
        r = train_rows[-1]
        lines.append(f"- last logged step {r['step']}: loss {r['loss']:.4f}, train accuracy {r['accuracy']:.3f}")
    if eval_rows:
        r = eval_rows[-1]
        tasks = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in r.items() if k.startswith("eval_accuracy/"))
        lines.append(f"- validation at step {r['step']}: accuracy {r['eval_accuracy']:.3f} ({tasks})")
    if report is not None:
        lines += ["", "## Test accuracy (`eval.videoqa`)", "",
                  f"{report['examples']} questions of `{report['data']}` (seed {report.get('seed')}, frames "
                  f"{report.get('frames')}), {report.get('device', '')}.", "",
                  "| variant | accuracy | " + " | ".join(sorted(report["results"][0]["per_task"])) +
                  " | achieved budget | prefill speedup |",
                  "|---|---|" + "---|" * len(report["results"][0]["per_task"]) + "---|---|"]
        for row in report["results"]:
            tasks = " | ".join(f"{c['accuracy']:.3f}" for _, c in sorted(row["per_task"].items()))
            speed = row.get("prefill_speedup")
            lines.append(f"| {row['variant']} | {row['accuracy']:.3f} | {tasks} | {row['achieved_budget']:.3f} | "
                         f"{'-' if speed is None else f'{speed:.2f}x'} |")
    return "\n".join(lines) + "\n"


def _load_config(path: str) -> dict:
    """The dict of a config file's get_config() (InputError naming --base_config)."""
    cli_checks.input_file("--base_config", path)
    try:
        return runpy.run_path(path)["get_config"]().to_dict()
    except Exception as e:  # noqa: BLE001 -- user code: any failure means it cannot be loaded
        raise cli.InputError(f"--base_config: {path}: cannot load ({type(e).__name__}: {e})") from None


def _relative(path: str) -> str:
    """`path` relative to the repository root when it lies inside it (configs/...)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(configs.__file__)))
    rel = os.path.relpath(os.path.abspath(path), root)
    return path if rel.startswith("..") else rel


def ship(workdir: str, *, name: str, out: str, report_path: str | None, base_config: str,
         overwrite: bool = False) -> str:
    """Writes out/name (see the module docstring); returns its path."""
    model_dir = os.path.join(workdir, MODEL_DIR)
    cli_checks.checkpoint_dir("--workdir", model_dir, tokenizer=True)
    chain = stages(os.path.abspath(model_dir))
    cli_checks.require(bool(chain), "--workdir", f"{model_dir}: no {TRAINING_FILE} (not written by train.finetune)")
    report = None
    if report_path is not None:
        cli_checks.input_file("--report", report_path)
        with open(report_path) as f:
            report = json.load(f)
    target = os.path.join(out, name)
    if os.path.exists(target) and not overwrite:
        raise cli.InputError(f"--out: {target} exists (--overwrite replaces it)")
    base = _load_config(base_config)
    model = from_pretrained(model_dir, dtype="float32")
    metrics_path = os.path.join(workdir, METRICS_FILE)
    metrics = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        stage = os.path.join(tmp, name)
        export_hf(model, stage, dtype="float32", extra_files=(os.path.join(model_dir, TOKENIZER_FILE),))
        with open(os.path.join(stage, TRAINING_FILE), "w") as f:
            json.dump([dict(step=s["step"], config=s["config"]) for s in chain], f, indent=2)
        if metrics:
            shutil.copy2(metrics_path, os.path.join(stage, METRICS_FILE))
        if report_path is not None:
            shutil.copy2(report_path, os.path.join(stage, "videoqa.json"))
        with open(os.path.join(stage, "MODEL_CARD.md"), "w") as f:
            f.write(model_card(name, model, chain, base, _relative(base_config), metrics, report))
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(stage) for n in ns)
        cli_checks.require(size <= MAX_BYTES, "--workdir", f"the packaged model is {size / 2**20:.1f} MiB, over "
                                                            f"the {MAX_BYTES / 2**20:.0f} MiB limit")
        if os.path.exists(target):
            shutil.rmtree(target)
        os.rename(stage, target)
    return target


def main(argv) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    F = flags.FLAGS
    if not F.workdir:
        raise cli.UsageError("--workdir: required (a finished train.finetune run)")
    path = ship(F.workdir, name=F.name, out=F.out, report_path=F.report, base_config=F.base_config,
                overwrite=F.overwrite)
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main, define_flags)
