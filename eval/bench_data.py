"""Does the training input pipeline keep up with a training step of the tiny VLM?

    python -m eval.bench_data                        # 16 frames, batch 8: pipeline vs train step
    python -m eval.bench_data --workers 2 --read_threads 4 --json out.json
    python -m eval.bench_data --runlocal             # 4 random frames, batch 2, a 2-layer LM: ~20 s on 2 cores

Pipeline: `hybridvlm.data.pipeline.train_pipeline` over SynthVideoQA records
generated on the fly (`SynthSource`, `--source synth`, the default: generation
is part of the pipeline's cost, as in a finetuning run without prepared data)
or over random uint8 frames made with numpy when a record is read
(`--source random`, any frame count; `--runlocal` uses it), configured from the tiny VLM of
`configs/tiny_vlm.py` (128x128 frames, 2-frame tubelets, 16 tokens per
tubelet) with one frame bucket of `--frames` frames: resize, normalise, pack
tubelets, lay out and tokenize the video prompt, batch. Its rate is the
examples per second it delivers (`--batches` batches after the first, numpy
on the host, nothing else running).

Train step: the same model's jitted step (forward, next-token cross-entropy on
the pipeline's labels, backward, optax AdamW) on one batch of that pipeline;
compile excluded, median of `--steps` steps after a warm-up. Its rate is the
examples per second a training loop consumes. (The weights are drawn with
numpy, `random_model`: the same program as `eval.inputs.build_tiny_vlm`'s
model without its per-shape init compiles; `--runlocal` also cuts the LM to
two layers and the tower to one block.)

ratio = pipeline rate / step rate: >= 1 means the pipeline keeps the step fed
(on this machine; the two share its CPU cores when they run together).
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

from configs import tiny_vlm
from eval.inputs import tiny_vlm_config
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.data import synth
from hybridvlm.data.pipeline import PipelineConfig, train_pipeline
from hybridvlm.data.records import VideoQARecord
from hybridvlm.tokenizer import byte_tokenizer
from hybridvlm.vlm import NemotronHVLModel

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
# --runlocal: small batches and few repeats; explicit flags still win.
RUNLOCAL = dict(frames=4, batch=2, steps=2, batches=4, examples=16, source="random")
# --runlocal also shrinks the model to seconds of compile: one Mamba and one attention layer, one tower block.
RUNLOCAL_MODEL = dict(pattern="M*")
RUNLOCAL_VISION = dict(num_layers=1)


class RandomFramesSource:
    """SynthVideoQA-like records with random frames made when read (random access, picklable)."""

    def __init__(self, size: int, *, frames: int, side: int, seed: int = 0):
        self.size, self.frames, self.side, self.seed = size, frames, side, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> VideoQARecord:
        rng = np.random.default_rng([self.seed, int(i)])
        frames = rng.integers(0, 256, (self.frames, self.side, self.side, 3), dtype=np.uint8)
        shape, options = SHAPES[i % len(SHAPES)], tuple(rng.choice(COLORS, 3, replace=False))
        return VideoQARecord(uid=f"bench/{i}", question=f"What color is the {shape}?", options=options,
                             answer=int(rng.integers(3)), task="color", frames=frames,
                             timestamps=np.arange(self.frames) * 0.5)


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only (the eval modules share flag names)."""
    flags.DEFINE_integer("frames", 16, "Frames per video (the one frame bucket).")
    flags.DEFINE_integer("batch", 8, "Global batch size.")
    flags.DEFINE_integer("steps", 5, "Timed training steps (median reported).")
    flags.DEFINE_integer("batches", 20, "Timed pipeline batches (after the first).")
    flags.DEFINE_integer("examples", 256, "Records in the source (it repeats).")
    flags.DEFINE_enum("source", "synth", ["synth", "random"],
                      "Records: SynthVideoQA generated on the fly (SynthSource, >= 16 frames), or random frames.")
    flags.DEFINE_integer("workers", 0, "grain worker processes (0: in this process).")
    flags.DEFINE_integer("read_threads", 2, "Threads preparing examples per worker.")
    flags.DEFINE_integer("prefetch", 2, "Batches prefetched per worker (or by a thread with --workers 0).")
    flags.DEFINE_bool("runlocal", False, f"Small sizes: {RUNLOCAL}.")
    flags.DEFINE_string("json", None, "Write the numbers, the settings and machine info as JSON here.")


def machine_info() -> dict:
    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=dev.device_kind, cpu_count=os.cpu_count(),
                platform=platform.platform(), python=platform.python_version(), jax=jax.__version__)


def pipeline_rate(it, batches: int) -> tuple[float, dict]:
    """Examples per second over `batches` batches (the first batch, with the pipeline's
    start-up, is taken before the clock starts); returns (rate, first batch)."""
    first = next(it)
    t0 = time.perf_counter()
    n = sum(int(np.sum(next(it)["valid"])) for _ in range(batches))
    return n / (time.perf_counter() - t0), first


def random_model(vlm_config, seed: int = 0) -> NemotronHVLModel:
    """The model with numpy-drawn weights (normal, std 0.02; biases 0, norm scales 1): the same
    program as `eval.inputs.build_tiny_vlm`'s (timings do not depend on the values),
    without compiling one random-init program per parameter shape (~15 s on 2 cores)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NemotronHVLModel(vlm_config, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def draw(path, x):  # numpy, then one transfer: jnp.zeros/ones would compile a program per shape
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(x.dtype, jnp.floating) or "['bias']" in name or "['b']" in name:
            value = np.zeros(x.shape)
        elif "norm" in name:
            value = np.ones(x.shape)
        else:
            value = rng.normal(0.0, 0.02, x.shape)
        return jax.device_put(value.astype(x.dtype))

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def train_step_rate(model, batch, steps: int) -> tuple[float, float, float]:
    """(examples per second, median step seconds, compile seconds) of a jitted AdamW step."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-3)
    inputs = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "pixel_values_videos", "labels",
                                                  "loss_mask")}

    def loss_fn(p, x):
        m = nnx.merge(graphdef, p, rest)
        logits = m(x["input_ids"], attention_mask=x["attention_mask"], pixel_values_videos=x["pixel_values_videos"])
        mask = x["loss_mask"].astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(x["loss_mask"], x["labels"], 0))
        return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    def step(p, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = tx.init(params)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, inputs).compile()
    compile_s = time.perf_counter() - t0
    params, opt_state, loss = compiled(params, opt_state, inputs)  # warm-up
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, inputs)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    if not np.isfinite(float(loss)):
        raise FloatingPointError(f"the training step's loss is {float(loss)}")
    median = statistics.median(times)
    return batch["input_ids"].shape[0] / median, median, compile_s


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    given = lambda name: not F[name].using_default_value
    sizes = {name: F[name].value for name in RUNLOCAL}
    if F.runlocal:
        sizes.update({name: value for name, value in RUNLOCAL.items() if not given(name)})
    for name in ("frames", "batch", "steps", "batches", "examples"):
        cli_checks.at_least(f"--{name}", sizes[name], 1)
    for name in ("workers", "read_threads", "prefetch"):
        cli_checks.at_least(f"--{name}", F[name].value, 0)
    if F.json:
        cli_checks.output_file("--json", F.json)
    model_cfg = tiny_vlm.get_config()
    if F.runlocal:
        model_cfg.model.update(RUNLOCAL_MODEL)
        model_cfg.vision.update(RUNLOCAL_VISION)
    vlm = tiny_vlm_config(model_cfg)
    frames = -(-sizes["frames"] // vlm.temporal_patch_size) * vlm.temporal_patch_size  # whole tubelets
    cfg = PipelineConfig.for_model(vlm, batch_size=sizes["batch"], buckets=(frames,), workers=F.workers,
                                   read_threads=F.read_threads, prefetch=F.prefetch)
    if sizes["source"] == "synth":
        if frames < synth.MIN_FRAMES:
            raise cli.UsageError(f"--frames: SynthVideoQA videos have at least {synth.MIN_FRAMES} frames, got "
                                 f"{frames} (use --source random for shorter ones)")
        source = synth.SynthSource(seed=0, size=sizes["examples"], num_frames=frames, frame_size=cfg.image_size)
    else:
        source = RandomFramesSource(sizes["examples"], frames=frames, side=cfg.image_size)
    info = machine_info()
    print(f"machine: {info['cpu_count']} CPU cores, backend={info['backend']} device={info['device']}; "
          f"tiny VLM ({cfg.image_size}x{cfg.image_size} frames, {cfg.tokens_per_tubelet} tokens per tubelet), "
          f"{frames} frames of {sizes['source']} records, batch {cfg.batch_size}, row length {cfg.row_length(frames)}; pipeline workers="
          f"{cfg.workers} read_threads={cfg.read_threads} prefetch={cfg.prefetch}", flush=True)
    it = iter(train_pipeline(source, cfg, tokenizer=byte_tokenizer(), shard=(0, 1)))
    try:
        pipe_rate, batch = pipeline_rate(it, sizes["batches"])
    finally:
        it.close()
    print(f"pipeline:   {pipe_rate:8.1f} examples/s  ({sizes['batches']} batches)", flush=True)
    step_rate, step_s, compile_s = train_step_rate(random_model(vlm, model_cfg.seed), batch, sizes["steps"])
    print(f"train step: {step_rate:8.1f} examples/s  (median {step_s * 1e3:.0f} ms/step of {sizes['steps']}, "
          f"compile {compile_s:.1f}s excluded)")
    ratio = pipe_rate / step_rate
    verdict = "keeps up" if ratio >= 1 else "is the bottleneck"
    print(f"ratio pipeline / step: {ratio:.2f}x (the pipeline {verdict} on {info['cpu_count']} CPU cores)")
    if F.json:
        atomic.write_json(F.json, dict(
            machine=info, settings=dict(sizes, workers=cfg.workers, read_threads=cfg.read_threads,
                                        prefetch=cfg.prefetch, row_length=cfg.row_length(frames),
                                        image_size=cfg.image_size),
            pipeline_examples_per_s=pipe_rate, train_step_examples_per_s=step_rate, train_step_seconds=step_s,
            compile_seconds=compile_s, ratio=ratio))


if __name__ == "__main__":
    cli.run(main, define_flags)
