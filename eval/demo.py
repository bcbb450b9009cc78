"""Demo: a video and a question -> the answer, with the prefill time.

    python -m eval.demo                                          # embedded default
    python -m eval.demo --video clip.mp4 --question "..." --checkpoint DIR
    python -m eval.demo --image photo.png --question "..." --checkpoint DIR
    python -m eval.demo --checkpoint LM_DIR --question "..."     # text-only LM
    python -m eval.demo --config.max_frames=32                   # override config fields

With no arguments it writes a short procedurally generated clip to a
temporary directory and answers with the tiny **randomly initialised,
untrained** VLM of configs/tiny_vlm.py and a byte-level tokenizer: nothing
is downloaded or prepared, and the answer is noise. It shows the whole path
running: decoding and sampling frames, tubelets, the vision tower, visual
tokens scattered into the prompt, prefill and jitted decoding.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import configs
import hybridvlm
from hybridvlm.config import LMConfig
from hybridvlm.prompt import image_prompt, video_prompt
from hybridvlm.radio import RadioConfig
from hybridvlm.tokenizer import byte_tokenizer
from hybridvlm.video import frames_to_pixels, pack_tubelets, read_image, read_video, write_test_clip
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("tiny_vlm"), "ml_collections config file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF or hybridvlm checkpoint directory (default: tiny random VLM).")
_VIDEO = flags.DEFINE_string("video", None, "Video file (mp4, webm, mkv, avi); default: a generated clip.")
_IMAGE = flags.DEFINE_string("image", None, "Image file (png, jpg) instead of a video.")
_QUESTION = flags.DEFINE_string("question", None, "Question about the video (default: the config's).")
_JSON = flags.DEFINE_string("json", None, "Also write the result as JSON to this path.")

# Nemotron Nano VL frame side when a checkpoint's config does not force one.
DEFAULT_IMAGE_SIZE = 512


def build_tiny_vlm(cfg) -> NemotronHVLModel:
    """The embedded default model (random weights) from a tiny_vlm config."""
    vcfg = VLMConfig(
        text=LMConfig(**cfg.model), vision=RadioConfig(**cfg.vision), image_token_id=cfg.image_token_id,
        projector_hidden_size=cfg.projector_hidden_size, image_size=cfg.image_size,
    )
    return NemotronHVLModel(vcfg, rngs=nnx.Rngs(cfg.seed))


def load_model(cfg, checkpoint):
    """Returns (model, tokenizer, label)."""
    if checkpoint is None:
        return build_tiny_vlm(cfg), byte_tokenizer(), "tiny random VLM (UNTRAINED: the answer is noise)"
    model = hybridvlm.from_pretrained(checkpoint)
    tok = hybridvlm.load_tokenizer(checkpoint)
    if tok is None:
        raise app.UsageError(f"{checkpoint}: no tokenizer.json next to the weights")
    return model, tok, checkpoint


def video_inputs(model: NemotronHVLModel, tok, cfg, video: str, question: str):
    """Decodes and samples the video; returns (prompt ids (1, t), pixels (1, T', 6, S, S), info)."""
    vc = model.config
    side = vc.image_size or DEFAULT_IMAGE_SIZE
    clip = read_video(video, max_frames=cfg.max_frames, fps=cfg.fps, size=(side, side))
    pixels = frames_to_pixels(clip.frames, mean=vc.vision.norm_mean, std=vc.vision.norm_std)
    tubelets = pack_tubelets(pixels, vc.temporal_patch_size)[None]
    image_token = tok.id_to_token(vc.image_token_id)
    if image_token is None:
        raise app.UsageError(f"tokenizer has no token with the model's image_token_id {vc.image_token_id}")
    text = video_prompt(question, clip.timestamps, num_frames=len(clip.timestamps),
                        temporal_patch=vc.temporal_patch_size, tokens_per_tubelet=vc.tokens_per_tubelet(side, side),
                        image_token=image_token, start_token=vc.image_start_token, end_token=vc.image_end_token)
    info = dict(video=video, frames=len(clip.timestamps), timestamps=[round(float(t), 3) for t in clip.timestamps])
    return text, jnp.asarray(tubelets), info


def image_inputs(model: NemotronHVLModel, tok, image: str, question: str):
    """Decodes and resizes one image; returns (prompt text, pixels (1, 3, S, S), info)."""
    vc = model.config
    side = vc.image_size or DEFAULT_IMAGE_SIZE
    clip = read_image(image, size=(side, side))
    pixels = frames_to_pixels(clip.frames, mean=vc.vision.norm_mean, std=vc.vision.norm_std)
    text = image_prompt(question, tokens=vc.tokens_per_tubelet(side, side), image_token=tok.id_to_token(vc.image_token_id),
                        start_token=vc.image_start_token, end_token=vc.image_end_token)
    return text, jnp.asarray(pixels), dict(image=image)


def run(cfg, checkpoint=None, video=None, question=None, image=None) -> dict:
    model, tok, label = load_model(cfg, checkpoint)
    question = cfg.question if question is None else question
    tcfg = model.text_config
    inputs, info = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        if video is not None and image is not None:
            raise app.UsageError("give --video or --image, not both")
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
            if video is not None or image is not None:
                raise app.UsageError(f"{checkpoint} is a text-only language model; it takes no --video/--image")
            text = question
    ids = tok.encode(text).ids
    if tcfg.bos_token_id is not None:
        ids = [tcfg.bos_token_id] + ids
    input_ids = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(input_ids)
    if hasattr(model, "check_inputs"):
        model.check_inputs(input_ids, **inputs)

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
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    r = run(_CONFIG.value, _CHECKPOINT.value, _VIDEO.value, _QUESTION.value, _IMAGE.value)
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
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    app.run(main)
