"""Perception pretraining of a fresh video VLM's tower on SynthVideoQA's ground truth.

    python -m train.pretrain_vision --config configs/synth_video_qa_tiny.py --workdir DIR --steps 4000
    python -m train.finetune --config configs/synth_video_qa_tiny.py --workdir DIR2 \\
        --config.init=DIR/model --config.optim.freeze=vision

A VLM's tower is pretrained before the language model learns questions about what it sees
(RADIO itself is distilled from image teachers before a VLM is built on it). Here the
teacher is the generator: every visual token (after pixel shuffle, where the projector
reads it) learns, through a linear head, the shape and the colour of every frame of its
tubelet (one of SHAPES / COLORS, or blank). Each token is asked about its whole frame, not
only its own pixels, so the tower must spread what a frame holds over all of its tokens:
any token that survives pruning can then answer for its frame.

Measured: finetuning the LM on questions from scratch stays at chance for thousands of steps
while the tower has not learned shapes (README, "The shipped model"); with direct supervision
colour is learned in a few hundred steps and shape in a few thousand.

DIR receives metrics.jsonl (train rows: loss, shape_accuracy, color_accuracy; eval rows on a
fixed validation batch) and model/ (the whole VLM: the pretrained tower, the projector and
the LM at their initialisation; `--config.init=DIR/model` of train.finetune). The job is
short (minutes on a CPU) and restarts from scratch when run again on a DIR without model/;
a DIR that already holds model/ is refused. The config's `model`, `tokenizer`, `seed` and
`data.frame_size` are used; `--config.data.frames` sets the clips' length.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from einops import rearrange
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

import configs
from hybridvlm import cli
from hybridvlm.config import ConfigError
from hybridvlm.data import synth
from hybridvlm.video import frames_to_pixels, pack_tubelets
from hybridvlm.tokenizer import named_tokenizer
from hybridvlm.vlm import NemotronHVLModel, pixel_shuffle
from train.metrics import MetricsLog
from train.model import save_model, vlm_config

MODEL_DIR = "model"
# Classes of each head: the SHAPES / COLORS indices, and a last one for a blank frame
# (background only, a curriculum's hidden event).
NUM_SHAPES, NUM_COLORS = len(synth.SHAPES) + 1, len(synth.COLORS) + 1


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.path("synth_video_qa_tiny"), "ml_collections config file "
                                    "(its model, tokenizer, seed and data fields).")
    flags.DEFINE_string("workdir", None, "Run directory: metrics.jsonl and model/.")
    flags.DEFINE_integer("steps", 4000, "Optimizer steps.")
    flags.DEFINE_integer("batch_size", 8, "Clips per step.")
    flags.DEFINE_float("learning_rate", 2e-3, "Peak AdamW learning rate (warm-up, then cosine to 5%).")
    flags.DEFINE_integer("log_every", 100, "Steps between train rows (and evaluations, on a fixed batch).")
    flags.DEFINE_integer("eval_examples", 32, "Validation clips of the evaluation batch.")


class PerceptionHeads(nnx.Module):
    """Linear heads on the pixel-shuffled tower features: per token, per tubelet frame,
    logits over shapes and over colours (each with a blank class)."""

    def __init__(self, din: int, temporal_patch: int, *, rngs: nnx.Rngs):
        self.temporal_patch = temporal_patch
        self.shape = nnx.Linear(din, temporal_patch * NUM_SHAPES, rngs=rngs)
        self.color = nnx.Linear(din, temporal_patch * NUM_COLORS, rngs=rngs)

    def __call__(self, merged):
        """merged: (n, a, b, din) -> (shape logits (n, a, b, tp, NUM_SHAPES), colour logits (..., NUM_COLORS))."""
        split = lambda x: rearrange(x, "n a b (p k) -> n a b p k", p=self.temporal_patch)
        return split(self.shape(merged)), split(self.color(merged))


class Perceiver(nnx.Module):
    """The VLM (whose tower and final vision norm train) with the perception heads."""

    def __init__(self, model: NemotronHVLModel, *, rngs: nnx.Rngs):
        cfg = model.config
        self.model = model
        din = cfg.vision.hidden_size * cfg.merge ** 2
        self.heads = PerceptionHeads(din, cfg.temporal_patch_size, rngs=rngs)

    def __call__(self, tubelets):
        """tubelets: (clips, tubelets, tp * 3, H, W) normalised pixels -> the heads' logits, with
        n = clips * tubelets tokens grids of (a, b) = (H, W) / (patch * merge)."""
        cfg = self.model.config
        H, W = tubelets.shape[-2:]
        ps = cfg.vision.patch_size
        feats = self.model.video_features(tubelets)
        if self.model.vision_norm is not None:
            feats = self.model.vision_norm(feats)
        grid = rearrange(feats, "n (r c) d -> n r c d", r=H // ps, c=W // ps)
        return self.heads(pixel_shuffle(grid, cfg.merge))


def make_batch(source: synth.SynthSource, indices, mean, std, temporal_patch: int):
    """(tubelets (B, T/tp, tp*3, S, S) float32, shape labels (B, T/tp, tp) int32, colour labels)
    for the records `indices` of `source`; blank frames get the last class."""
    pix, shapes, colors = [], [], []
    for i in indices:
        r = source[int(i)]
        pix.append(pack_tubelets(frames_to_pixels(r.frames, mean=mean, std=std), temporal_patch))
        s, c = r.meta["frame_shape"], r.meta["frame_color"]
        shapes.append(np.where(s < 0, NUM_SHAPES - 1, s).reshape(-1, temporal_patch))
        colors.append(np.where(c < 0, NUM_COLORS - 1, c).reshape(-1, temporal_patch))
    return np.stack(pix), np.stack(shapes).astype(np.int32), np.stack(colors).astype(np.int32)


def losses(perceiver: Perceiver, tubelets, shapes, colors):
    """(mean cross-entropy of both heads over every token and frame, (shape accuracy, colour accuracy))."""
    s_logits, c_logits = perceiver(tubelets)
    # Every token of a tubelet is asked about the tubelet's frames.
    s_lab = rearrange(shapes, "b t p -> (b t) 1 1 p")
    c_lab = rearrange(colors, "b t p -> (b t) 1 1 p")
    s_lab = jnp.broadcast_to(s_lab, s_logits.shape[:-1])
    c_lab = jnp.broadcast_to(c_lab, c_logits.shape[:-1])
    ce = (optax.softmax_cross_entropy_with_integer_labels(s_logits, s_lab).mean()
          + optax.softmax_cross_entropy_with_integer_labels(c_logits, c_lab).mean())
    acc = ((s_logits.argmax(-1) == s_lab).mean(), (c_logits.argmax(-1) == c_lab).mean())
    return ce, acc


def check_frames(text: str) -> int:
    """The first length of `data.frames` (a clip length in 16..256 that the tubelets divide)."""
    try:
        n = int(str(text).split(",")[0])
    except ValueError:
        raise cli.UsageError(f"--config.data.frames={text!r}: not a frame count") from None
    if not synth.MIN_FRAMES <= n <= synth.MAX_FRAMES:
        raise cli.UsageError(f"--config.data.frames={text!r}: must be in [{synth.MIN_FRAMES}, {synth.MAX_FRAMES}]")
    return n


def run(cfg, workdir: str, *, steps: int, batch_size: int, learning_rate: float, log_every: int,
        eval_examples: int) -> dict:
    """Trains the tower and the heads for `steps` steps; writes metrics and model/; returns the last eval row."""
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every),
                        ("eval_examples", eval_examples)):
        if value < 1:
            raise cli.UsageError(f"--{name}={value}: must be >= 1")
    if not learning_rate > 0:
        raise cli.UsageError(f"--learning_rate={learning_rate}: must be > 0")
    if os.path.exists(os.path.join(workdir, MODEL_DIR)):
        raise cli.InputError(f"--workdir: {workdir} already holds {MODEL_DIR}/ (a finished run); use a new directory")
    vcfg = vlm_config(cfg.model)
    frames = check_frames(cfg.data.frames)
    size = int(cfg.data.frame_size)
    if size != vcfg.image_size:
        raise cli.UsageError(f"--config.data.frame_size={size}: must equal the model's image_size {vcfg.image_size}")
    tok = named_tokenizer(cfg.tokenizer)
    mean, std = vcfg.vision.norm_mean, vcfg.vision.norm_std
    tp = vcfg.temporal_patch_size
    if frames % tp:
        raise cli.UsageError(f"--config.data.frames={frames}: not a multiple of the tubelet length {tp}")
    train = synth.SynthSource(synth.split_seed(cfg.seed, "train"), steps * batch_size, frames, frame_size=size)
    val = synth.SynthSource(synth.split_seed(cfg.seed, "validation"), eval_examples, frames, frame_size=size)
    val_batch = make_batch(val, range(eval_examples), mean, std, tp)

    perceiver = Perceiver(NemotronHVLModel(vcfg, rngs=nnx.Rngs(cfg.seed)), rngs=nnx.Rngs(cfg.seed + 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 10 + 1), steps,
                                                  end_value=0.05 * learning_rate)
    trainable = nnx.Any(nnx.PathContains("vision"), nnx.PathContains("vision_norm"), nnx.PathContains("heads"))
    optimizer = nnx.Optimizer(perceiver, optax.chain(optax.clip_by_global_norm(1.0),
                                                     optax.adamw(schedule, b2=0.95, weight_decay=0.05)),
                              wrt=nnx.All(nnx.Param, trainable))

    @nnx.jit
    def train_step(perceiver, optimizer, tubelets, shapes, colors):
        diff = nnx.DiffState(0, nnx.All(nnx.Param, trainable))
        grad_fn = nnx.value_and_grad(lambda p: losses(p, tubelets, shapes, colors), argnums=diff, has_aux=True)
        (loss, acc), grads = grad_fn(perceiver)
        optimizer.update(perceiver, grads)
        return loss, acc

    @nnx.jit
    def eval_step(perceiver, tubelets, shapes, colors):
        return losses(perceiver, tubelets, shapes, colors)

    os.makedirs(workdir, exist_ok=True)
    log = MetricsLog(workdir, resume_step=None, tensorboard=False)
    last, pending, t0 = {}, [], time.time()
    try:
        for step in tqdm(range(1, steps + 1), desc="pretrain_vision", mininterval=10):
            batch = make_batch(train, range((step - 1) * batch_size, step * batch_size), mean, std, tp)
            pending.append(train_step(perceiver, optimizer, *batch))
            if step % log_every == 0 or step == steps:
                loss, (s_acc, c_acc) = jax.tree.map(lambda *x: float(np.mean(x)), *pending)
                log.write(step, dict(loss=loss, shape_accuracy=s_acc, color_accuracy=c_acc,
                                     learning_rate=float(schedule(step)), steps_per_s=len(pending) / (time.time() - t0)))
                loss, (s_acc, c_acc) = jax.tree.map(float, eval_step(perceiver, *val_batch))
                last = log.write(step, dict(split="eval", eval_loss=loss, eval_shape_accuracy=s_acc,
                                            eval_color_accuracy=c_acc), prefix="eval")
                pending, t0 = [], time.time()
    finally:
        log.close()
    save_model(perceiver.model, tok, os.path.join(workdir, MODEL_DIR),
               training=dict(step=steps, stage="pretrain_vision", config=json.loads(cfg.to_json()),
                             batch_size=batch_size, learning_rate=learning_rate))
    return last


def main(argv) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.workdir:
        raise cli.UsageError("--workdir: required (the run directory)")
    try:
        last = run(f.config, f.workdir, steps=f.steps, batch_size=f.batch_size, learning_rate=f.learning_rate,
                   log_every=f.log_every, eval_examples=f.eval_examples)
    except ConfigError as e:
        raise cli.InputError(str(e)) from None
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))


if __name__ == "__main__":
    cli.run(main, define_flags)
