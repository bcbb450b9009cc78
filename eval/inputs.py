"""Inputs shared by the eval scripts: the embedded tiny model, checkpoints, video/image prompts.

No flags here, so every `python -m eval.<name>` script can import it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import hybridvlm
from hybridvlm.config import LMConfig
from hybridvlm.prompt import image_prompt, video_prompt
from hybridvlm.radio import RadioConfig
from hybridvlm.tokenizer import byte_tokenizer
from hybridvlm.video import frames_to_pixels, pack_tubelets, read_image, read_video
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

UNTRAINED_LABEL = "tiny random VLM (UNTRAINED: the answer is noise)"

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
        return build_tiny_vlm(cfg), byte_tokenizer(), UNTRAINED_LABEL
    model = hybridvlm.from_pretrained(checkpoint)
    tok = hybridvlm.load_tokenizer(checkpoint)
    if tok is None:
        raise ValueError(f"{checkpoint}: no tokenizer.json next to the weights")
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
        raise ValueError(f"tokenizer has no token with the model's image_token_id {vc.image_token_id}")
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


def encode(model, tok, text: str) -> list[int]:
    """Token ids of `text`, with the model's BOS first when it has one."""
    ids = tok.encode(text).ids
    bos = model.text_config.bos_token_id
    return ids if bos is None else [bos] + ids
