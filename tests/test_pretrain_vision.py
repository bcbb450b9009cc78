"""`python -m train.pretrain_vision`: labels from the generator's ground truth, only the tower
trains, the saved VLM loads and starts train.finetune, errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import hybridvlm
from configs import finetune_synth
from hybridvlm import cli
from hybridvlm.data import synth
from hybridvlm.vlm import NemotronHVLModel
from train import pretrain_vision as pv
from train.metrics import read_metrics
from train.model import vlm_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
    c = finetune_synth.get_config()  # the tiny byte-tokenizer VLM: patch 16 on 64x64 frames
    c.data.frames = "16"
    return c


def test_labels_are_each_tubelet_frames_shape_and_colour():
    c = _config()
    vcfg = vlm_config(c.model)
    src = synth.SynthSource(5, 4, 16, frame_size=64, distractors=0.0)  # blank frames too
    tub, shapes, colors = pv.make_batch(src, [1, 3], vcfg.vision.norm_mean, vcfg.vision.norm_std, 2)
    assert tub.shape == (2, 8, 6, 64, 64) and shapes.shape == colors.shape == (2, 8, 2)
    for row, i in enumerate([1, 3]):
        meta = src[i].meta
        fs, fc = meta["frame_shape"].reshape(8, 2), meta["frame_color"].reshape(8, 2)
        assert (fs < 0).any(), "the example should have blank frames"
        np.testing.assert_array_equal(shapes[row], np.where(fs < 0, pv.NUM_SHAPES - 1, fs))
        np.testing.assert_array_equal(colors[row], np.where(fc < 0, pv.NUM_COLORS - 1, fc))


def _flat(model) -> dict[str, np.ndarray]:
    """{"vision/blocks/0/...": array} of a model's parameters."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(v)
            for path, v in leaves}


def test_only_the_tower_trains_and_the_model_loads(tmp_path):
    c = _config()
    last = pv.run(c, str(tmp_path / "run"), steps=6, batch_size=2, learning_rate=1e-2, log_every=3,
                  eval_examples=2)
    assert last["step"] == 6 and 0.0 <= last["eval_shape_accuracy"] <= 1.0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 3, 6, 6]
    assert all(np.isfinite(r.get("loss", r.get("eval_loss"))) for r in rows)

    trained = hybridvlm.from_pretrained(str(tmp_path / "run" / "model"), dtype="float32")
    fresh = NemotronHVLModel(vlm_config(c.model), rngs=nnx.Rngs(c.seed))
    flat_t = _flat(trained)
    flat_f = _flat(NemotronHVLModel(vlm_config(c.model), rngs=nnx.Rngs(c.seed)))
    assert flat_t.keys() == flat_f.keys()
    flat = {k: bool(np.any(flat_t[k] != flat_f[k])) for k in flat_t}
    assert any(v for k, v in flat.items() if k.startswith("vision/")), "the tower did not train"
    others = [k for k, v in flat.items() if v and not k.startswith(("vision/", "vision_norm/"))]
    assert not others, f"parameters outside the tower changed: {others[:3]}"
    with open(tmp_path / "run" / "model" / "training.json") as fh:
        assert json.load(fh)["stage"] == "pretrain_vision"


def test_a_finished_workdir_is_refused(tmp_path):
    (tmp_path / "run" / pv.MODEL_DIR).mkdir(parents=True)
    with pytest.raises(cli.InputError, match="already holds model/"):
        pv.run(_config(), str(tmp_path / "run"), steps=1, batch_size=1, learning_rate=1e-3, log_every=1,
               eval_examples=1)


@pytest.mark.parametrize("field, value, message", [
    ("frames", "17", "not a multiple of the tubelet length 2"),
    ("frame_size", 32, "must equal the model's image_size 64"),
])
def test_bad_configs_are_refused_before_anything_is_written(tmp_path, field, value, message):
    c = _config()
    c.data[field] = value
    with pytest.raises(cli.UsageError, match=message):
        pv.run(c, str(tmp_path / "run"), steps=1, batch_size=1, learning_rate=1e-3, log_every=1, eval_examples=1)
    assert not (tmp_path / "run").exists()


# The CLI's own checks and its conversion of a ConfigError, one process each.
@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps=0: must be >= 1"),
    (["--config.data.frames=17"], "not a multiple of the tubelet length 2"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    cmd = [sys.executable, "-m", "train.pretrain_vision", "--config", "configs/finetune_synth.py",
           "--workdir", str(tmp_path / "run"), "--config.data.frames=16", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


def _stage(directory, step: int, config: dict, **extra) -> str:
    os.makedirs(directory)
    with open(os.path.join(directory, "training.json"), "w") as f:
        json.dump(dict(step=step, config=config, **extra), f)
    return str(directory)


def test_a_shipped_chain_reproduces_the_pretraining_stage_with_its_own_command(tmp_path):
    from train import ship

    base = finetune_synth.get_config().to_dict()
    pre = json.loads(json.dumps(base))
    pre["seed"] = 3  # a config override pretrain_vision took too
    first = _stage(tmp_path / "v" / "model", 1500, pre, stage="pretrain_vision", batch_size=16, learning_rate=0.002)
    q = json.loads(json.dumps(base))
    q["init"], q["steps"], q["optim"]["freeze"], q["data"]["target"] = first, 900, "vision", "option"
    last = _stage(tmp_path / "q" / "model", 900, q)
    chain = ship.stages(last)
    assert [st["stage"] for st in chain] == ["pretrain_vision", "finetune"]
    lines = ship.reproduce(chain, base, "configs/finetune_synth.py")
    assert lines[0] == ("python -m train.pretrain_vision --config configs/finetune_synth.py --workdir runs/stage1 "
                        "--steps 1500 --batch_size 16 --learning_rate 0.002 --config.seed=3")
    assert lines[1] == ("python -m train.finetune --config configs/finetune_synth.py --workdir runs/stage2 "
                        "--config.init=runs/stage1/model --config.data.target=option --config.optim.freeze=vision "
                        "--config.steps=900")
