"""Demo: a video and a question -> the answer, with the prefill time.

    python -m eval.demo                                          # embedded default
    python -m eval.demo --video clip.mp4 --question "..." --checkpoint DIR
    python -m eval.demo --image photo.png --question "..." --checkpoint DIR
    python -m eval.demo --checkpoint LM_DIR --question "..."     # text-only LM
    python -m eval.demo --config.max_frames=32 --config.fps=2.0  # override config fields
    python -m eval.demo --help                                   # flags and config fields

With no arguments it writes a short procedurally generated clip to a
temporary directory and answers with the tiny **randomly initialised,
untrained** VLM of configs/tiny_vlm.py and a byte-level tokenizer: nothing
is downloaded or prepared, and the answer is noise. It shows the whole path
running: decoding and sampling frames, tubelets, the vision tower, visual
tokens scattered into the prompt, prefill and jitted decoding.

Paths, the checkpoint directory and config values are checked before the
model is built; an error prints one line (`--debug` for the traceback).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

import configs
from eval.inputs import check_generation_config, check_model_source, encode, image_inputs, load_model, video_inputs
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.video import write_test_clip
from hybridvlm.vlm import NemotronHVLModel


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only, so the eval modules can be
    imported together (they share flag names such as --config and --json)."""
    config_flags.DEFINE_config_file("config", configs.path("tiny_vlm"), "ml_collections config file.")
    flags.DEFINE_string("checkpoint", None, "HF or hybridvlm checkpoint directory (default: tiny random VLM).")
    flags.DEFINE_string("video", None, "Video file (mp4, webm, mkv, avi); default: a generated clip.")
    flags.DEFINE_string("image", None, "Image file (png, jpg) instead of a video.")
    flags.DEFINE_string("question", None, "Question about the video (default: the config's).")
    flags.DEFINE_string("json", None, "Also write the result as JSON to this path.")


def check_args(cfg, checkpoint=None, video=None, image=None) -> None:
    """Checks the inputs without building the model: UsageError / cli.InputError naming the flag."""
    if video is not None and image is not None:
        raise cli.UsageError("--video, --image: give one of them, not both")
    check_generation_config(cfg)
    is_vlm = check_model_source(cfg, checkpoint)
    if not is_vlm and (video is not None or image is not None):
        raise cli.UsageError(f"--checkpoint: {checkpoint} is a text-only language model; it takes no --video/--image")
    if video is not None:
        cli_checks.media_file("--video", video)
    if image is not None:
        cli_checks.media_file("--image", image)


def run(cfg, checkpoint=None, video=None, question=None, image=None) -> dict:
    check_args(cfg, checkpoint, video, image)
    model, tok, label = load_model(cfg, checkpoint)
    question = cfg.question if question is None else question
    tcfg = model.text_config
    inputs, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, NemotronHVLModel) and image is not None:
            text, pixels, info = image_inputs(model, tok, image, question)
            inputs["pixel_values"] = pixels
        elif isinstance(model, NemotronHVLModel):
            if video is None:
                video = os.path.join(tmp, "generated_clip.mp4")
                write_test_clip(video)
                info["generated_clip"] = True
            text, pixels, vinfo = video_inputs(model, tok, cfg, video, question)
            inputs["pixel_values_videos"] = pixels
            info.update(vinfo)
        else:
            text = question
    ids = encode(model, tok, text)
    input_ids = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(input_ids)
    model.check_inputs(input_ids, mask, **inputs)

    # Prefill alone (vision tower included), compiled ahead so the timing excludes compilation.
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, i, m, x: nnx.merge(graphdef, s).prefill(i, m, i.shape[1], **x)[0])
    t0 = time.perf_counter()
    compiled = prefill.lower(state, input_ids, mask, inputs).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled(state, input_ids, mask, inputs).block_until_ready()
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = model.generate(input_ids, mask, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                         top_p=cfg.top_p, **inputs)
    out = np.asarray(jax.device_get(out))[0].tolist()
    generate_s = time.perf_counter() - t0
    stops = set(tcfg.eos_token_id)
    answer_ids = [t for t in out if t != tcfg.pad_token_id]
    answer_ids = answer_ids[: next((i for i, t in enumerate(answer_ids) if t in stops), len(answer_ids))]
    return dict(
        model=label, backend=jax.default_backend(), question=question, prompt_tokens=len(ids),
        visual_tokens=int(np.sum(np.asarray(ids) == getattr(model.config, "image_token_id", -1))),
        answer=tok.decode(answer_ids), answer_ids=out, prefill_s=prefill_s, prefill_compile_s=compile_s,
        generate_s=generate_s, **info,
    )


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.json:
        cli_checks.output_file("--json", flags.FLAGS.json)
    r = run(flags.FLAGS.config, flags.FLAGS.checkpoint, flags.FLAGS.video, flags.FLAGS.question, flags.FLAGS.image)
    print(f"model    : {r['model']}")
    print(f"backend  : {r['backend']}")
    if "video" in r:
        source = "generated clip" if r.get("generated_clip") else r["video"]
        print(f"video    : {source}, {r['frames']} frames at {r['timestamps']} s")
    if "image" in r:
        print(f"image    : {r['image']}")
    print(f"question : {r['question']!r}")
    print(f"prompt   : {r['prompt_tokens']} tokens ({r['visual_tokens']} visual)")
    print(f"answer   : {r['answer']!r}")
    print(f"prefill  : {r['prefill_s'] * 1e3:.1f} ms (compiled ahead: {r['prefill_compile_s']:.2f} s)")
    print(f"generate : {r['generate_s']:.2f} s for {len(r['answer_ids'])} steps incl. compilation")
    if flags.FLAGS.json:
        atomic.write_json(flags.FLAGS.json, r)


if __name__ == "__main__":
    cli.run(main, define_flags)
