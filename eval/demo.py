"""Demo: a video and a question -> the answer, with the full and the reduced prefill side by side.

    python -m eval.demo                                          # a SynthVideoQA question, default model
    python -m eval.demo --seed 7 --clip_out clip.png             # the same question every time; frames as PNG
    python -m eval.demo --video clip.mp4 --question "..." --checkpoint DIR
    python -m eval.demo --image photo.png --question "..." --checkpoint DIR
    python -m eval.demo --checkpoint LM_DIR --question "..."     # text-only LM
    python -m eval.demo --config.max_frames=32                   # override config fields
    python -m eval.demo --help                                   # flags and config fields

With no --video, --image or --question it draws a SynthVideoQA clip and its multiple-choice
question (a new one each run, or the one of --seed), shows the clip event by event and the
question, and answers it twice: with the full prefill and with the paper's progressive plan
at --budget (0.25), printing the correct answer next to each, the visual tokens kept per
stage and both prefill times. The default model is the one shipped in the package
(`synth-video-qa-tiny`) when present, else the tiny **randomly initialised, untrained** VLM
of configs/tiny_vlm.py (labelled so: its answers are noise). Nothing is downloaded.

With --video / --image / --question it answers the user's own question by greedy decoding.
Paths, the checkpoint directory and config values are checked before the model is built; an
error prints one line (`--debug` for the traceback).
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
from eval import demo_synth
from eval.inputs import (DEFAULT_IMAGE_SIZE, check_generation_config, check_model_source, encode, image_inputs,
                         load_model, video_inputs)
from eval.qa_variants import FULL, PLAN_NAMES
from hybridvlm.data import synth
from hybridvlm.shipped import pretrained_names, resolve_checkpoint
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
    flags.DEFINE_integer("seed", None, "Seed of the SynthVideoQA question (default: a new one each run).",
                         lower_bound=0)
    flags.DEFINE_enum("plan", "progressive", [n for n in PLAN_NAMES if n != FULL],
                      "Reduction plan compared with the full prefill.")
    flags.DEFINE_float("budget", 0.25, "Kept share of visual token-layers of the reduced prefill.")
    flags.DEFINE_string("clip_out", None, "Also save the SynthVideoQA clip's frames as a PNG grid here.")


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


SHIPPED_MODEL = "synth-video-qa-tiny"


def default_checkpoint() -> str | None:
    """The shipped model's directory when the package has it, else None (the tiny random VLM)."""
    return resolve_checkpoint(SHIPPED_MODEL) if SHIPPED_MODEL in pretrained_names() else None


def new_seed() -> int:
    """A fresh question seed from the OS's entropy: a new question each run, repeatable with
    --seed and the printed value."""
    return int(np.random.SeedSequence().entropy % 2**31)


def synth_mode(video=None, image=None, question=None) -> bool:
    """The default question (a SynthVideoQA clip) unless the user gives their own input."""
    return video is None and image is None and question is None


def run_synth(cfg, checkpoint=None, *, seed=None, plan="progressive", budget=0.25, clip_out=None) -> dict:
    """A SynthVideoQA question answered with the full and the reduced prefill (see module docstring)."""
    cli_checks.in_range("--config.max_frames", cfg.max_frames, synth.MIN_FRAMES, synth.MAX_FRAMES)
    cli_checks.in_range("--budget", budget, 0.0, 1.0, low_open=True)
    if clip_out is not None:
        cli_checks.output_file("--clip_out", clip_out)
    if checkpoint is None:
        checkpoint = default_checkpoint()
    if not check_model_source(cfg, checkpoint):
        raise cli.UsageError(f"--checkpoint: {checkpoint} is a text-only language model; give --question for it")
    if seed is None:
        seed = new_seed()
    model, tok, label = load_model(cfg, checkpoint)
    side = model.config.image_size or DEFAULT_IMAGE_SIZE
    record = demo_synth.pick_example(seed, num_frames=cfg.max_frames, frame_size=side)
    if clip_out is not None:
        demo_synth.save_contact_sheet(record, clip_out)
    try:
        result = demo_synth.answer_full_and_reduced(model, tok, record, plan=plan, budget=budget)
    except ValueError as e:  # a plan that cannot meet the budget for this many tokens
        raise cli.UsageError(f"--plan {plan} --budget {budget}: {e}") from None
    return dict(model=label, backend=jax.default_backend(), seed=seed, task=record.task, uid=record.uid,
                frames=len(record.frames), frame_size=side, events=demo_synth.describe_clip(record), question=record.text(),
                clip_out=clip_out, **result)


def print_synth(r: dict) -> None:
    print(f"model    : {r['model']}")
    print(f"backend  : {r['backend']}")
    print(f"clip     : SynthVideoQA {r['task']} question, seed {r['seed']} (--seed {r['seed']} repeats it), "
          f"{r['frames']} frames at 2 fps" + (f", frames saved to {r['clip_out']}" if r["clip_out"] else ""))
    print("\n".join(r["events"]))
    print("question :")
    print("\n".join("  " + line for line in r["question"].splitlines()))
    print(f"prompt   : {r['prompt_tokens']} tokens ({r['visual_tokens']} visual); vision tower "
          f"{r['vision_s'] * 1e3:.1f} ms")
    print(f"correct  : {r['answer']}. {r['answer_option']}")
    for k in ("full", "reduced"):
        x = r[k]
        what = "full prefill" if k == "full" else f"{r['plan']} @ {r['budget']:g}"
        kept = " -> ".join(f"{keep} before layer {layer}" for layer, keep in x["stages"]) or "all"
        mark = "right" if x["correct"] else "wrong"
        print(f"{what:<18}: answer {x['letter']}. {x['option']} ({mark}); prefill {x['prefill_s'] * 1e3:.1f} ms; "
              f"visual tokens kept: {kept} (budget {x['achieved_budget']:.3f})")
    print(f"speedup  : {r['full']['prefill_s'] / r['reduced']['prefill_s']:.2f}x prefill")


def run(cfg, checkpoint=None, video=None, question=None, image=None) -> dict:
    """The user's own question (and video or image) answered by greedy decoding."""
    if checkpoint is None:
        checkpoint = default_checkpoint()
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
    F = flags.FLAGS
    if F.json:
        cli_checks.output_file("--json", F.json)
    if synth_mode(F.video, F.image, F.question):
        check_args(F.config, F.checkpoint)
        r = run_synth(F.config, F.checkpoint, seed=F.seed, plan=F.plan, budget=F.budget, clip_out=F.clip_out)
        print_synth(r)
        if F.json:
            atomic.write_json(F.json, r)
        return
    r = run(F.config, F.checkpoint, F.video, F.question, F.image)
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
    if F.json:
        atomic.write_json(F.json, r)


if __name__ == "__main__":
    cli.run(main, define_flags)
