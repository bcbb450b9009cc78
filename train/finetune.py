"""Sharded finetuning of a hybrid video VLM under token reduction.

    python -m train.finetune --config configs/finetune_synth.py --workdir DIR
    python -m train.finetune --workdir DIR --config.steps=1000 --config.mesh.tensor=2 \\
        --config.reduction.shape=step --config.reduction.budget=0.25
    python -m train.finetune --help                     # flags and every config field

Runs `config.steps` optimizer steps of the jitted, sharded train step (train/step.py) on
batches of the grain pipeline, under the reduction plan of each frame bucket. Re-running
the same command on the same DIR resumes from the newest checkpoint (parameters, optimizer
state, step, RNG and data iterator), and reaches the same parameters as a run that was
never interrupted. SIGTERM saves a checkpoint and exits (status 0; run it again to go on).

DIR receives:
    config.json                the run's config (a resumed run must match it, except for
                               the step counts and intervals, the mesh and `distributed`)
    metrics.jsonl              one row per logged step and per evaluation
    tensorboard/               the same scalars as TensorBoard event files
    checkpoints/<step>/        Orbax train checkpoints (the last `keep_checkpoints`)
    model/                     the final model, loadable by `hybridvlm.from_pretrained`

Inputs (config values, data paths, the init checkpoint, DIR) are checked before a model is
built; an error prints one line (`--debug` for the traceback).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

import configs
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.config import ConfigError
from hybridvlm.vlm import VLMConfig
from hybridvlm.data.pipeline import PipelineConfig, answer_token_ids, eval_pipeline, train_pipeline
from hybridvlm.data import synth
from hybridvlm.data.pipeline_config import TARGETS, PipelineError
from hybridvlm.remat import REMAT_POLICIES
from hybridvlm.tokenizer import TOKENIZERS, named_tokenizer
from reduction import plan as rp
from reduction.evs import evs_keep_count
from train import data as tdata
from train import distributed
from train.checkpoint import TrainCheckpointer, preemption_guard
from train.evaluate import evaluate, make_eval_step
from train.mesh import MeshConfig, make_mesh, sequence_split
from train.metrics import METRICS_FILE, MetricsLog, read_metrics
from train.model import check_init, save_model, start_model, trained_step, vlm_config
from train.optim import PARTS, OptimConfig, make_optimizer
from train.state import StateLayout
from train.step import make_train_step, split_model, step_inputs

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
# Fields a resumed run may change: how long it runs, how often it logs and saves, where.
RESUMABLE_CHANGES = ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "mesh",
                     "distributed", "tensorboard", "compilation_cache", "data.workers")
# Fields added to the config after runs began, at the value that behaves as before the field
# existed: a run started earlier resumes with them.
# data.tasks: "" (unset) already resumes.
ADDED_DEFAULTS = {"data.target": "letter", "data.distractors": 1.0, "data.turns": 0}


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.path("finetune_synth"), "ml_collections config file.")
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config, final model (resumed "
                                         "if it holds a checkpoint).")


# ----------------------------------------------------------------------------- checks


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the config asks for, checked (no model built, nothing read but paths)."""

    vlm: VLMConfig | None  # None: from the init checkpoint
    optim: OptimConfig
    mesh: MeshConfig
    train_data: tdata.DataSpec
    eval_data: tdata.DataSpec | None
    buckets: tuple[int, ...]
    frames: tuple[int, ...]
    compute_dtype: Any


def compute_dtype(name: str):
    """The dtype of `name`; "auto": bfloat16 on accelerators, float32 on CPU (whose XLA
    backend emulates bfloat16 arithmetic, several times slower than float32)."""
    if name == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(name)


def _ints(text: str, field: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise cli.UsageError(f"{field}={text!r}: expected comma-separated integers, e.g. 16,32") from None
    cli_checks.require(bool(values), field, "needs at least one value")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(text or "").split(",") if v.strip())


def check_config(cfg) -> Settings:
    """Checks every field; UsageError / ConfigError / InputError naming it."""
    cli_checks.at_least("--config.steps", cfg.steps, 1)
    cli_checks.at_least("--config.batch_size", cfg.batch_size, 1)
    cli_checks.at_least("--config.log_every", cfg.log_every, 1)
    cli_checks.at_least("--config.eval_every", cfg.eval_every, 0)
    cli_checks.at_least("--config.checkpoint_every", cfg.checkpoint_every, 1)
    cli_checks.at_least("--config.keep_checkpoints", cfg.keep_checkpoints, 1)
    cli_checks.at_least("--config.seed", cfg.seed, 0)
    freeze = _names(cfg.optim.freeze)
    bad = [p for p in freeze if p not in PARTS]
    cli_checks.require(not bad, "--config.optim.freeze", f"unknown part(s) {bad}; choose among {', '.join(PARTS)}")
    o = cfg.optim
    try:
        optim = OptimConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.steps,
                            end_lr_factor=o.end_lr_factor, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                            clip_norm=o.clip_norm, accumulate=o.accumulate, freeze=freeze)
    except ValueError as e:  # "OptimConfig.<field> ..."; total_steps is config.steps
        text = str(e).replace("OptimConfig.total_steps", "--config.steps").replace("OptimConfig.", "--config.optim.")
        raise cli.UsageError(text) from None
    cli_checks.require(cfg.batch_size % optim.accumulate == 0, "--config.optim.accumulate",
                       f"{optim.accumulate} micro-batches do not split --config.batch_size={cfg.batch_size}")
    try:
        mesh = MeshConfig.from_config(cfg.mesh)
        mesh.sizes(jax.device_count())
    except ValueError as e:
        raise cli.UsageError(f"--config.{e}") from None
    data, fsdp, _, _ = mesh.sizes(jax.device_count())
    cli_checks.require(cfg.batch_size % (data * fsdp) == 0, "--config.batch_size",
                       f"{cfg.batch_size} rows do not split over mesh.data x mesh.fsdp = {data * fsdp} devices")
    cli_checks.require(cfg.remat is None or cfg.remat in REMAT_POLICIES, "--config.remat",
                       f"unknown policy {cfg.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    try:
        dtype = compute_dtype(cfg.compute_dtype)
    except TypeError:
        raise cli.UsageError(f"--config.compute_dtype={cfg.compute_dtype!r}: not a dtype (or \"auto\")") from None
    cli_checks.require(jnp.issubdtype(dtype, jnp.floating), "--config.compute_dtype", f"{dtype} is not floating")
    r = cfg.reduction
    cli_checks.require((r.shape is None) == (r.budget is None), "--config.reduction",
                       "set both reduction.shape and reduction.budget (or neither, for no reduction)")
    if r.shape is not None:
        cli_checks.require(r.shape in rp.NAMED, "--config.reduction.shape",
                           f"unknown plan {r.shape!r}; choose one of {', '.join(rp.NAMED)}")
        cli_checks.in_range("--config.reduction.budget", r.budget, 0.0, 1.0, low_open=True)
    buckets = _ints(cfg.data.buckets, "--config.data.buckets")
    cli_checks.at_least("--config.data.train_examples", cfg.data.train_examples, 1)
    cli_checks.at_least("--config.data.eval_examples", cfg.data.eval_examples, 1)
    cli_checks.at_least("--config.data.workers", cfg.data.workers, 0)
    frames = _ints(cfg.data.frames, "--config.data.frames")
    cli_checks.require(max(frames) <= max(buckets), "--config.data.frames",
                       f"{max(frames)} frames do not fit the largest bucket ({max(buckets)})")
    cli_checks.at_least("--config.data.frame_text_tokens", cfg.data.frame_text_tokens, 0)
    cli_checks.at_least("--config.data.text_tokens", cfg.data.text_tokens, 1)
    cli_checks.in_range("--config.data.distractors", cfg.data.distractors, 0.0, 1.0)
    cli_checks.at_least("--config.text_loss", cfg.text_loss, 0.0)
    cli_checks.at_least("--config.data.turns", cfg.data.turns, 0)
    cli_checks.require(cfg.data.turns == 0 or cfg.data.train == "synth", "--config.data.turns",
                       f"question-answer turns need generated SynthVideoQA (--config.data.train=synth, "
                       f"not {cfg.data.train!r})")
    cli_checks.require(cfg.data.distractors == 1.0 or cfg.data.train == "synth", "--config.data.distractors",
                       f"blanking distractor events needs generated SynthVideoQA (--config.data.train=synth, "
                       f"not {cfg.data.train!r})")
    bad_tasks = [t for t in cfg.data.tasks.split(",") if t and t not in synth.TASKS]
    cli_checks.require(not bad_tasks, "--config.data.tasks",
                       f"unknown SynthVideoQA task(s) {', '.join(bad_tasks)}; choose among {', '.join(synth.TASKS)}")
    cli_checks.require(not cfg.data.tasks or cfg.data.train == "synth", "--config.data.tasks",
                       f"choosing tasks needs generated SynthVideoQA (--config.data.train=synth, not {cfg.data.train!r})")
    cli_checks.require(cfg.data.target in TARGETS, "--config.data.target",
                       f"unknown target {cfg.data.target!r}; choose one of {', '.join(TARGETS)}")
    cli_checks.require(cfg.tokenizer in TOKENIZERS, "--config.tokenizer",
                       f"unknown tokenizer {cfg.tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    try:
        train_data = tdata.parse_spec(cfg.data.train, "--config.data.train")
        eval_data = tdata.parse_spec(cfg.data.eval, "--config.data.eval") if cfg.data.eval else None
    except tdata.DataSpecError as e:
        raise cli.InputError(str(e)) from None
    prepared = [s for s in (train_data, eval_data) if s is not None and s.kind == "synth" and s.path]
    cli_checks.require(len(frames) == 1 or not prepared, "--config.data.frames",
                       "a prepared SynthVideoQA split (synth:DIR) has one video length; give one value")
    check_init(cfg.init)
    vlm = None
    if cfg.init is None:
        try:
            vlm = vlm_config(cfg.model)
        except ConfigError as e:
            raise cli.UsageError(str(e)) from None
        for b in buckets:
            cli_checks.require(b % vlm.temporal_patch_size == 0, "--config.data.buckets",
                               f"{b} frames is not a multiple of the tubelet length {vlm.temporal_patch_size}")
        check_tokenizer(named_tokenizer(cfg.tokenizer), vlm)
    return Settings(vlm=vlm, optim=optim, mesh=mesh, train_data=train_data, eval_data=eval_data, buckets=buckets,
                    frames=frames, compute_dtype=dtype)


def check_tokenizer(tok, vlm: VLMConfig) -> None:
    """A fresh model's vocabulary holds the tokenizer's, and its image_token_id is "<image>"."""
    size = tok.get_vocab_size()
    cli_checks.require(vlm.text.vocab_size >= size, "--config.model.text.vocab_size",
                       f"{vlm.text.vocab_size} rows cannot embed the {size}-token --config.tokenizer")
    image = tok.token_to_id("<image>")  # the placeholder of both built-in tokenizers
    cli_checks.require(image == vlm.image_token_id, "--config.model.image_token_id",
                       f"{vlm.image_token_id} is not the tokenizer's <image> id ({image})")


def flat_config(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict keyed by dotted field names."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir(workdir: str, config: dict) -> None:
    """The run directory is usable, and a run already there had this config (up to
    RESUMABLE_CHANGES)."""
    cli_checks.output_dir("--workdir", workdir)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise cli.InputError(f"--workdir: {path}: cannot read the earlier run's config ({e})") from None
    old, new = flat_config(saved), flat_config(json.loads(json.dumps(config)))
    allowed = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)
    # A field the code gained after the run started, left unset ("off"), changes nothing.
    added_unset = lambda k: k not in old and (new.get(k) in (None, "", 0, False)
                                               or k in ADDED_DEFAULTS and new[k] == ADDED_DEFAULTS[k])
    changed = sorted(k for k in set(old) | set(new)
                     if old.get(k) != new.get(k) and not allowed(k) and not added_unset(k))
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise cli.InputError(f"--workdir: {workdir} holds a run with another config ({detail}); use a new "
                             "--workdir, or the same config to resume")


# ----------------------------------------------------------------------------- the run


def plans_for_buckets(shape: str | None, budget: float | None, pcfg: PipelineConfig, num_layers: int):
    """{frames bucket: ReductionPlan or None}; PlanError if a bucket cannot meet the budget."""
    if shape is None:
        return {b: None for b in pcfg.buckets}
    return {b: rp.named(shape, num_layers, pcfg.visual_tokens(b), budget) for b in pcfg.buckets}


def check_sequence_split(vcfg, pcfg: PipelineConfig, shards: int) -> None:
    """UsageError naming --config.mesh.sequence unless every bucket's LM prompt (its row after
    EVS) splits into `shards` equal blocks no shorter than the Mamba conv's halo."""
    for bucket in pcfg.buckets:
        length = pcfg.row_length(bucket)
        rate = vcfg.video_pruning_rate
        if rate > 0:
            tubelets, per = pcfg.tubelets(bucket), pcfg.tokens_per_tubelet
            length -= tubelets * per - evs_keep_count(tubelets, per, rate)
        cli_checks.require(length % shards == 0, "--config.mesh.sequence",
                           f"bucket {bucket}: its {length}-token LM prompt does not split into {shards} equal shards")
        cli_checks.require(length // shards >= vcfg.text.conv_kernel - 1, "--config.mesh.sequence",
                           f"bucket {bucket}: {shards} shards of {length // shards} tokens are shorter than the "
                           f"Mamba conv's {vcfg.text.conv_kernel - 1}-token halo")


def _sources(cfg, settings: Settings):
    d = cfg.data
    frames = settings.frames if len(settings.frames) > 1 else settings.frames[0]
    kw = dict(seed=cfg.seed, num_frames=frames, frame_size=d.frame_size)
    # The curriculum's blanked distractors, task subset and turns are for training only: validation is the real task.
    tasks = tuple(t for t in d.tasks.split(",") if t) or None
    train = tdata.source(settings.train_data, "train", num_examples=d.train_examples, distractors=d.distractors,
                         tasks=tasks, turns=d.turns, **kw)
    val = None
    if settings.eval_data is not None:
        val = tdata.source(settings.eval_data, "validation", num_examples=d.eval_examples, **kw)
    return train, val


def run(cfg, workdir: str) -> dict:
    """The whole job; returns the last logged training row plus the last evaluation."""
    settings = check_config(cfg)
    config = cfg.to_dict()
    check_workdir(workdir, config)
    process_index, _ = distributed.maybe_initialize(cfg.distributed)
    if cfg.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache)
    primary = process_index == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        atomic.write_json(os.path.join(workdir, CONFIG_FILE), config)

    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    done = _finished(workdir, cfg.steps)
    if done is not None:
        if primary:
            print(f"{workdir}: finished at step {cfg.steps}; nothing to do (raise --config.steps to go on)")
        return done

    mesh = make_mesh(settings.mesh)
    vcfg = settings.vlm
    model, tok = start_model(cfg.init, vcfg, mesh, seed=cfg.seed, tokenizer=cfg.tokenizer)
    vcfg = model.config
    pcfg = PipelineConfig.for_model(vcfg, batch_size=cfg.batch_size, buckets=settings.buckets,
                                    workers=cfg.data.workers, seed=cfg.seed,
                                    frame_text_tokens=cfg.data.frame_text_tokens, text_tokens=cfg.data.text_tokens,
                                    target=cfg.data.target)
    plans = plans_for_buckets(cfg.reduction.shape, cfg.reduction.budget, pcfg, vcfg.text.num_layers)
    sequence, plans = sequence_split(mesh, plans)
    if sequence is not None:
        check_sequence_split(vcfg, pcfg, sequence.shards)
    letters = answer_token_ids(tok)
    graphdef, params, rest = split_model(model)
    del model
    tx = make_optimizer(settings.optim, params)
    layout = StateLayout.of(params, tx, mesh)
    step_fn = layout.jit_step(make_train_step(
        graphdef, rest, tx, optim_config=settings.optim, answer_ids=letters, plan_for_bucket=plans,
        compute_dtype=settings.compute_dtype, remat_policy=cfg.remat, constrain=layout.constrain,
        text_weight=cfg.text_loss, max_text_tokens=cfg.data.text_tokens, sequence=sequence))
    eval_fn = layout.jit_eval(make_eval_step(graphdef, rest, answer_ids=letters, plan_for_bucket=plans,
                                             compute_dtype=settings.compute_dtype, sequence=sequence))
    train_src, val_src = _sources(cfg, settings)
    it = iter(train_pipeline(train_src, pcfg, tokenizer=tok, mesh=mesh))

    ckpt = TrainCheckpointer(ckpt_dir, save_every=cfg.checkpoint_every,
                             keep=cfg.keep_checkpoints)
    start = ckpt.latest_step()
    if start is None:
        state = layout.create(params, tx, seed=cfg.seed)
    else:
        state, _ = ckpt.restore(start, abstract_state=layout.abstract(params, tx, seed=cfg.seed), data_iter=it)
    del params
    start = int(state.step)
    log = MetricsLog(workdir, resume_step=start if start else None, tensorboard=cfg.tensorboard, enabled=primary)
    bar = tqdm(total=cfg.steps, initial=start, desc="finetune", disable=not primary, dynamic_ncols=True,
               unit="step")
    last: dict = {}
    pending: list = []
    t0 = time.perf_counter()
    try:
        with preemption_guard() as guard:
            for step in range(start + 1, cfg.steps + 1):
                batch = next(it)
                state, metrics = step_fn(state, step_inputs(batch))
                pending.append(metrics)
                stop = guard.should_stop(step)
                ckpt.maybe_save(step, state, data_iter=it, config=config, force=stop or step == cfg.steps)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps or stop:
                    last = _log_train(log, step, pending, t0)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                    pending, t0 = [], time.perf_counter()
                if val_src is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                    # Finish the dispatched steps first, so the evaluation's time can be left
                    # out of the next row's throughput.
                    jax.block_until_ready(state.params)
                    t_eval = time.perf_counter()
                    ev = evaluate(eval_fn, state.params, iter(eval_pipeline(val_src, pcfg, tokenizer=tok, mesh=mesh)))
                    last.update(log.write(step, ev, prefix="eval"))
                    t0 += time.perf_counter() - t_eval
                if stop:
                    bar.write(f"stopping after step {step} (signal {guard.received}); run the same command to resume",
                              file=sys.stderr)
                    break
    finally:
        bar.close()
        log.close()
        ckpt.close()
        if hasattr(it, "close"):
            it.close()
    if int(state.step) == cfg.steps:
        if jax.process_count() == 1:
            _save_final(workdir, graphdef, state.params, rest, tok, dict(step=cfg.steps, config=config))
        elif primary:  # the export gathers the whole model in one process: single-host only
            print(f"multi-host run: the final state is {ckpt.directory}/{cfg.steps}; no {MODEL_DIR}/ export")
    return last


def _finished(workdir: str, steps: int) -> dict | None:
    """The last metrics rows of a run that already reached `steps` and exported its model
    (None when there is work left)."""
    if trained_step(os.path.join(workdir, MODEL_DIR)) != steps:
        return None
    rows = [r for r in read_metrics(os.path.join(workdir, METRICS_FILE)) if r.get("step") == steps] \
        if os.path.exists(os.path.join(workdir, METRICS_FILE)) else []
    return {k: v for r in rows for k, v in r.items()}


def _log_train(log: MetricsLog, step: int, pending: list, t0: float) -> dict:
    """One row from the metrics of the steps since the last row: means of loss, accuracy and
    gradient norm, the last learning rate, throughput over the interval (evaluations left
    out; the first row of a process includes the step's compilation)."""
    got = jax.device_get(pending)  # waits for the dispatched steps: only then is the interval over
    elapsed = time.perf_counter() - t0
    mean = lambda k: float(np.mean([m[k] for m in got]))
    tokens = float(np.sum([m["tokens"] for m in got]))
    row = dict(
        loss=mean("loss"), accuracy=mean("accuracy"), grad_norm=mean("grad_norm"),
        learning_rate=float(got[-1]["learning_rate"]), tokens_per_s=tokens / max(elapsed, 1e-9),
        steps_per_s=len(got) / max(elapsed, 1e-9))
    if "text_loss" in got[-1]:
        row["text_loss"] = mean("text_loss")
    return log.write(step, row)


def _save_final(workdir: str, graphdef, params, rest, tok, training: dict) -> None:
    """WORKDIR/model: the trained model (float32 masters), replacing an older one whole."""
    model = nnx.merge(graphdef, params, rest)
    final = os.path.join(workdir, MODEL_DIR)
    new = final + ".new"
    shutil.rmtree(new, ignore_errors=True)
    save_model(model, tok, new, training=training)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(new, final)


def main(argv) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = flags.FLAGS.workdir
    if not workdir:
        raise cli.UsageError("--workdir: required (the run directory)")
    cfg = flags.FLAGS.config
    try:
        last = run(cfg, workdir)
    except (PipelineError, ConfigError) as e:
        raise cli.InputError(str(e)) from None
    if last:
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}
        print(json.dumps(shown))


if __name__ == "__main__":
    cli.run(main, define_flags)
