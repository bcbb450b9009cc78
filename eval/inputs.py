"""Inputs shared by the eval scripts: the embedded tiny model, checkpoints, video/image prompts.

No flags here, so every `python -m eval.<name>` script can import it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

import hybridvlm
from hybridvlm import cli_checks
from hybridvlm.cli import UsageError
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.hf_import import CheckpointError
from hybridvlm.loading import is_vlm_checkpoint
from hybridvlm.prompt import image_prompt, video_prompt
from hybridvlm.radio import RadioConfig
from hybridvlm.tokenizer import byte_tokenizer
from hybridvlm.video import frames_to_pixels, pack_tubelets, read_image, read_video
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

UNTRAINED_LABEL = "tiny random VLM (UNTRAINED: the answer is noise)"

# Nemotron Nano VL frame side when a checkpoint's config does not force one.
DEFAULT_IMAGE_SIZE = 512


def tiny_vlm_config(cfg) -> VLMConfig:
    """The embedded default model's VLMConfig from a tiny_vlm config (cheap: builds no model).

    Raises UsageError naming --config for invalid model fields.
    """
    try:
        return VLMConfig(
            text=LMConfig(**cfg.model), vision=RadioConfig(**cfg.vision), image_token_id=cfg.image_token_id,
            projector_hidden_size=cfg.projector_hidden_size, image_size=cfg.image_size,
        )
    except (ConfigError, TypeError, ValueError) as e:  # TypeError: a field the dataclass does not have
        raise UsageError(f"--config: {e}") from None


def build_tiny_vlm(cfg) -> NemotronHVLModel:
    """The embedded default model (random weights) from a tiny_vlm config."""
    return NemotronHVLModel(tiny_vlm_config(cfg), rngs=nnx.Rngs(cfg.seed))


def check_generation_config(cfg) -> None:
    """Ranges of the sampling / decoding fields of a tiny_vlm-style config (UsageError naming the field)."""
    cli_checks.at_least("--config.max_frames", cfg.max_frames, 1)
    if cfg.fps is not None:  # unset: uniform sampling of max_frames over the clip
        cli_checks.require(cfg.fps > 0, "--config.fps", f"must be > 0 (or unset for uniform sampling), got {cfg.fps}")
    if "max_new_tokens" in cfg:
        cli_checks.at_least("--config.max_new_tokens", cfg.max_new_tokens, 1)
    if "temperature" in cfg:
        cli_checks.at_least("--config.temperature", cfg.temperature, 0.0)
    if "top_p" in cfg:
        cli_checks.in_range("--config.top_p", cfg.top_p, 0.0, 1.0, low_open=True)


def check_model_source(cfg, checkpoint: str | None, flag: str = "--checkpoint") -> bool:
    """Checks the model a script will load, without loading it; returns whether it is a VLM.

    checkpoint None: the embedded tiny VLM's config fields; otherwise the
    directory holds a checkpoint and a tokenizer.json.
    """
    if checkpoint is None:
        tiny_vlm_config(cfg)
        return True
    cli_checks.checkpoint_dir(flag, checkpoint, tokenizer=True)
    return is_vlm_checkpoint(checkpoint)


def load_model(cfg, checkpoint):
    """Returns (model, tokenizer, label)."""
    if checkpoint is None:
        return build_tiny_vlm(cfg), byte_tokenizer(), UNTRAINED_LABEL
    try:
        tok = hybridvlm.load_tokenizer(checkpoint)
    except ValueError as e:  # a tokenizer.json that does not load: the checkpoint is broken
        raise CheckpointError(str(e)) from None
    if tok is None:
        raise CheckpointError(f"{checkpoint}: no tokenizer.json next to the weights")
    model = hybridvlm.from_pretrained(checkpoint)
    return model, tok, checkpoint


def video_inputs(model: NemotronHVLModel, tok, cfg, video: str, question: str):
    """Decodes and samples the video; returns (prompt ids (1, t), pixels (1, T', 6, S, S), info)."""
    vc = model.config
    side = vc.image_size or DEFAULT_IMAGE_SIZE
    clip = read_video(video, max_frames=cfg.max_frames, fps=cfg.fps, size=(side, side))
    pixels = frames_to_pixels(clip.frames, mean=vc.vision.norm_mean, std=vc.vision.norm_std)
    tubelets = pack_tubelets(pixels, vc.temporal_patch_size)[None]
    image_token = _image_token(model, tok)
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
    text = image_prompt(question, tokens=vc.tokens_per_tubelet(side, side), image_token=_image_token(model, tok),
                        start_token=vc.image_start_token, end_token=vc.image_end_token)
    return text, jnp.asarray(pixels), dict(image=image)


def _image_token(model: NemotronHVLModel, tok) -> str:
    image_id = model.config.image_token_id
    token = tok.id_to_token(image_id)
    if token is None:
        raise CheckpointError(f"the tokenizer has no token with the model's image_token_id {image_id}")
    return token


def encode(model, tok, text: str) -> list[int]:
    """Token ids of `text`, with the model's BOS first when it has one."""
    ids = tok.encode(text).ids
    bos = model.text_config.bos_token_id
    return ids if bos is None else [bos] + ids
