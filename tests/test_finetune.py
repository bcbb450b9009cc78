"""`python -m train.finetune` end to end, as real processes (tiny model, float32, CPU).

- An uninterrupted run is the reference. A second run of the same config, killed with
  SIGKILL right after a checkpoint and resumed, ends with the reference's parameters
  bitwise, and its metrics.jsonl holds every step once with the reference's losses.
- The same config on 8 fake CPU devices (fsdp 2 x sequence 2 x tensor 2), stopped by SIGTERM
  (it saves and exits 0) and resumed on 1 device, matches the reference's losses and
  parameters (float32, tight tolerance).
- Bad config values, a bad data path and a workdir of another run are errors naming the
  field (one line from the command).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

import hybridvlm
from configs import finetune_synth
from hybridvlm import cli
from hybridvlm.data import synth
from hybridvlm.hf_import import CheckpointError
from train import finetune
from train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8

# A cut-down model (LM "M*-" of width 64, one vision block of width 32) so that each process
# compiles its step in seconds; float32 so that 8 devices can match 1 tightly.
TINY = [
    f"--config.steps={STEPS}", "--config.batch_size=4", "--config.log_every=1", "--config.eval_every=4",
    "--config.checkpoint_every=2", "--config.optim.warmup_steps=2", "--config.optim.learning_rate=3e-3",
    "--config.compute_dtype=float32", "--config.data.eval_examples=4", "--config.model.text.pattern=M*-",
    "--config.model.text.hidden_size=64", "--config.model.text.intermediate_size=128",
    "--config.model.text.mamba_num_heads=4", "--config.model.text.head_dim=16",
    "--config.model.vision.num_layers=1", "--config.model.vision.hidden_size=32",
    "--config.model.vision.num_heads=2", "--config.model.projector_hidden_size=64",
    "--config.reduction.shape=step", "--config.reduction.budget=0.5", "--config.optim.freeze=vision",
]


# The runs of this module share JAX's persistent compilation cache: a resumed run (and the
# reference's second start) loads the step compiled by the first instead of recompiling it.
CACHE: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
    yield
    CACHE.clear()


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(JAX_COMPILATION_CACHE_DIR=CACHE["dir"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _cmd(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "train.finetune", f"--workdir={workdir}", *TINY, *extra]


def _run(workdir, *extra, devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(_cmd(workdir, *extra), cwd=ROOT, env=_env(devices), capture_output=True, text=True,
                       timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def _params(workdir) -> dict:
    model = hybridvlm.from_pretrained(os.path.join(workdir, "model"))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _losses(workdir) -> dict[int, float]:
    rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _checkpoints(workdir) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _start_until_checkpoint(workdir, at_least: int, *extra, devices: int = 1) -> subprocess.Popen:
    """Starts the run; returns once checkpoint >= at_least is complete (the process still runs)."""
    p = subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(s >= at_least for s in _checkpoints(workdir)):
        assert p.poll() is None, f"run ended before checkpoint {at_least}: {p.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no checkpoint in 300 s"
        time.sleep(0.02)
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reference")
    p = _run(workdir)
    last = json.loads(p.stdout.strip().splitlines()[-1])
    return dict(workdir=workdir, params=_params(workdir), losses=_losses(workdir), last=last)


def test_a_run_writes_its_config_metrics_checkpoints_and_model(reference):
    w = reference["workdir"]
    losses = reference["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(np.isfinite(list(losses.values())))
    rows = read_metrics(os.path.join(w, "metrics.jsonl"))
    train = [r for r in rows if "loss" in r]
    assert all({"learning_rate", "tokens_per_s", "grad_norm"} <= set(r) for r in train)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(0 <= r["eval_accuracy"] <= 1 for r in evals)
    # 4 validation examples: one per task (TASKS[i % 4]); overall = the mean of the four.
    for r in evals:
        tasks = {k.split("/")[1]: v for k, v in r.items() if k.startswith("eval_accuracy/")}
        assert sorted(tasks) == sorted(("color", "shape", "order", "count")) and set(tasks.values()) <= {0.0, 1.0}
        assert r["eval_accuracy"] == pytest.approx(np.mean(list(tasks.values())))
    with open(os.path.join(w, "config.json")) as f:
        assert json.load(f)["steps"] == STEPS
    assert _checkpoints(w)[-1] == STEPS
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(w, "tensorboard")))
    assert reference["last"]["step"] == STEPS and "eval_accuracy" in reference["last"]
    # Running the finished command again trains nothing and changes nothing.
    _run(w)
    after = _params(w)
    for k, v in reference["params"].items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, tmp_path):
    w = tmp_path / "run"
    p = _start_until_checkpoint(w, 2)
    p.kill()  # SIGKILL: no handler runs, a save may be half-written
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert _checkpoints(w)[-1] < STEPS, "the run finished before it could be killed"
    _run(w)
    params = _params(w)
    for k, v in reference["params"].items():
        np.testing.assert_array_equal(params[k], v, err_msg=k)
    assert _losses(w) == reference["losses"]


def test_eight_devices_sigterm_then_resume_on_one_device_reach_the_reference(reference, tmp_path):
    # 8 fake devices (fsdp 2 x sequence 2 x tensor 2: each prompt split in two for the LM's
    # layers, hybridvlm.context) until SIGTERM, which saves and exits 0; the same command
    # then resumes on 1 device (the checkpoint restores onto another mesh). TINY's plan
    # drops even counts, so the sequence split keeps it as it is.
    w = tmp_path / "mesh"
    mesh = ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.sequence=2", "--config.mesh.tensor=2")
    p = _start_until_checkpoint(w, 2, *mesh, devices=8)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "stopping after step" in err
    stopped = _checkpoints(w)[-1]
    assert 2 <= stopped < STEPS, stopped
    assert max(_losses(w)) == stopped
    losses = _losses(w)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                               [reference["losses"][s] for s in sorted(losses)], rtol=1e-5)
    _run(w, "--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.sequence=1", "--config.mesh.tensor=1")
    params = _params(w)
    for k, v in reference["params"].items():
        np.testing.assert_allclose(params[k], v, rtol=0, atol=2e-5, err_msg=k)


@pytest.mark.parametrize("extra, status, message", [
    (("--config.reduction.shape=steep", "--config.reduction.budget=0.25"), 2, "--config.reduction.shape"),
    (("--config.data.train=jsonl:/nonexistent/q.jsonl",), 1, "--config.data.train: /nonexistent/q.jsonl"),
])
def test_bad_command_is_one_line(tmp_path, extra, status, message):
    p = _run(tmp_path / "w", *extra, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == status, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "w"), "nothing is written for a bad command"


@pytest.mark.parametrize("overrides, error, message", [
    (dict(reduction=dict(shape="step", budget=None)), cli.UsageError, "--config.reduction"),
    (dict(reduction=dict(shape="step", budget=1.5)), cli.UsageError, "--config.reduction.budget"),
    (dict(mesh=dict(tensor=3)), cli.UsageError, "mesh.tensor=3"),
    (dict(mesh=dict(fsdp=-1, data=-1)), cli.UsageError, "mesh.data and mesh.fsdp"),
    (dict(optim=dict(freeze="vision,tower")), cli.UsageError, "--config.optim.freeze"),
    (dict(optim=dict(warmup_steps=1000)), cli.UsageError, "--config.steps"),
    (dict(optim=dict(accumulate=3)), cli.UsageError, "--config.optim.accumulate"),
    (dict(batch_size=0), cli.UsageError, "--config.batch_size"),
    (dict(data=dict(buckets="16,x")), cli.UsageError, "--config.data.buckets"),
    (dict(data=dict(frames="16,64")), cli.UsageError, "--config.data.frames"),
    (dict(tokenizer="words"), cli.UsageError, "--config.tokenizer"),
    (dict(tokenizer="synth"), cli.UsageError, "--config.model.text.vocab_size"),
    (dict(data=dict(eval="videomme")), cli.InputError, "--config.data.eval"),
    (dict(remat="everything"), cli.UsageError, "--config.remat"),
    (dict(data=dict(target="word")), cli.UsageError, "--config.data.target"),
    (dict(data=dict(distractors=1.5)), cli.UsageError, "--config.data.distractors"),
    (dict(data=dict(distractors=0.5, train="jsonl:/x.jsonl")), cli.UsageError, "--config.data.distractors"),
    (dict(data=dict(turns=-1)), cli.UsageError, "--config.data.turns"),
    (dict(data=dict(turns=2, train="jsonl:/x.jsonl")), cli.UsageError, "--config.data.turns"),
    (dict(data=dict(tasks="color,colour")), cli.UsageError, "--config.data.tasks"),
    (dict(data=dict(tasks="color", train="jsonl:/x.jsonl")), cli.UsageError, "--config.data.tasks"),
    (dict(model=dict(text=dict(hidden_sise=8))), cli.UsageError, "--config.model"),
    (dict(init="/nonexistent/ckpt"), CheckpointError, "--config.init: /nonexistent/ckpt"),
])
def test_check_config_names_the_field(overrides, error, message):
    cfg = finetune_synth.get_config()
    if "model" in overrides:  # an unknown model field: ConfigDict refuses new keys, so build a bad dict
        cfg.model.text = dict(cfg.model.text, **overrides.pop("model")["text"])
    cfg.update_from_flattened_dict({f"{k}.{kk}" if isinstance(v, dict) else k: vv
                                    for k, v in overrides.items()
                                    for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])})
    with pytest.raises(error, match=re.escape(message)):
        finetune.check_config(cfg)


def test_a_sequence_split_that_does_not_divide_a_bucket_names_the_field():
    from hybridvlm.data.pipeline import PipelineConfig

    cfg = finetune_synth.get_config()
    settings = finetune.check_config(cfg)
    pcfg = PipelineConfig.for_model(settings.vlm, batch_size=cfg.batch_size, buckets=settings.buckets,
                                    frame_text_tokens=cfg.data.frame_text_tokens, text_tokens=cfg.data.text_tokens)
    length = pcfg.row_length(pcfg.buckets[0])
    finetune.check_sequence_split(settings.vlm, pcfg, 4)  # 64-token multiples split in 4
    with pytest.raises(cli.UsageError, match=rf"--config.mesh.sequence.*{length}-token LM prompt.*7 equal"):
        finetune.check_sequence_split(settings.vlm, pcfg, 7)
    with pytest.raises(cli.UsageError, match=r"--config.mesh.sequence.*shorter than the Mamba conv's 3-token halo"):
        finetune.check_sequence_split(settings.vlm, pcfg, length)


def test_a_workdir_of_another_run_is_refused(reference):
    p = _run(reference["workdir"], "--config.optim.learning_rate=0.1", check=False)
    assert p.returncode == 1 and "optim.learning_rate" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_the_shipped_models_config_checks_and_mixes_video_lengths():
    from configs import synth_video_qa_tiny

    cfg = synth_video_qa_tiny.get_config()
    cfg.data.frames = "16,32"
    settings = finetune.check_config(cfg)
    assert settings.frames == (16, 32) and settings.buckets == (16, 32, 64)
    train_src, _ = finetune._sources(cfg, settings)
    assert [len(train_src[i].frames) for i in range(3)] == [16, 32, 16]
    # A curriculum stage blanks distractors in the training clips only.
    cfg.data.distractors, cfg.data.tasks = 0.0, "count,order"
    train_src, val_src = finetune._sources(cfg, finetune.check_config(cfg))
    assert train_src.distractors == 0.0 and val_src.distractors == 1.0
    cfg.data.turns = 3  # question-answer turns: training clips only
    train_src, val_src = finetune._sources(cfg, finetune.check_config(cfg))
    assert train_src.turns == 3 and val_src.turns == 0
    assert [train_src[i].task for i in range(3)] == ["count", "order", "count"]
    assert [val_src[i].task for i in range(4)] == list(synth.TASKS)


def test_a_finished_run_ships_as_a_named_model(reference, tmp_path, monkeypatch):
    from hybridvlm import shipped
    from train import ship

    out = tmp_path / "pretrained"
    path = ship.ship(str(reference["workdir"]), name="tiny-test", out=str(out), report_path=None,
                     base_config=os.path.join(ROOT, "configs", "finetune_synth.py"))
    names = sorted(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json", "metrics.jsonl",
            "MODEL_CARD.md"} <= set(names)
    monkeypatch.setattr(shipped, "PRETRAINED_DIR", str(out))
    assert shipped.pretrained_names() == ("tiny-test",)
    # By name, the shipped model computes what the run's own model/ does.
    shipped_model = hybridvlm.from_pretrained("tiny-test")
    run_model = hybridvlm.from_pretrained(os.path.join(reference["workdir"], "model"), dtype="float32")
    a, b = nnx.state(shipped_model, nnx.Param), nnx.state(run_model, nnx.Param)
    for (pa, x), (pb, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        assert pa == pb and np.array_equal(np.asarray(x[...]), np.asarray(y[...])), pa
    assert hybridvlm.load_tokenizer("tiny-test").to_str() == hybridvlm.load_tokenizer(
        os.path.join(reference["workdir"], "model")).to_str()
    card = open(os.path.join(path, "MODEL_CARD.md")).read()
    # The card's command reproduces the run: the base config plus exactly the overrides TINY gave.
    line = next(l for l in card.splitlines() if l.startswith("python -m train.finetune"))
    assert line.startswith("python -m train.finetune --config configs/finetune_synth.py --workdir runs/stage1")
    for flag in ("--config.steps=8", "--config.optim.freeze=vision", "--config.reduction.shape=step"):
        assert flag in line, (flag, line)
    with pytest.raises(cli.InputError, match="exists"):
        ship.ship(str(reference["workdir"]), name="tiny-test", out=str(out), report_path=None,
                  base_config=os.path.join(ROOT, "configs", "finetune_synth.py"))


def test_resuming_tolerates_fields_added_unset_but_not_set_ones(tmp_path):
    cfg = finetune_synth.get_config().to_dict()
    finetune.check_workdir(str(tmp_path), cfg)  # a new directory
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    finetune.check_workdir(str(tmp_path), cfg)  # the same run
    grown = json.loads(json.dumps(cfg))
    grown["data"]["new_option"] = ""  # a field the code gained since, left unset
    finetune.check_workdir(str(tmp_path), grown)
    # Fields added later at the value that behaves as before resume too (data.target, ...).
    old = json.loads(json.dumps(cfg))
    del old["data"]["target"], old["data"]["distractors"], old["data"]["turns"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(old, f)
    finetune.check_workdir(str(tmp_path), cfg)
    cfg_option = json.loads(json.dumps(cfg))
    cfg_option["data"]["target"] = "option"
    with pytest.raises(cli.InputError, match="data.target"):
        finetune.check_workdir(str(tmp_path), cfg_option)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    grown["data"]["new_option"] = "on"
    with pytest.raises(cli.InputError, match="data.new_option"):
        finetune.check_workdir(str(tmp_path), grown)
    changed = json.loads(json.dumps(cfg))
    changed["optim"]["learning_rate"] = 0.5
    with pytest.raises(cli.InputError, match="optim.learning_rate"):
        finetune.check_workdir(str(tmp_path), changed)
