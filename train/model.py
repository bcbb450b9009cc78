"""The model a finetuning run starts from, built or loaded onto the device mesh, and its tokenizer.

    vcfg = vlm_config(cfg.model)                      # config fields -> VLMConfig (no model built)
    model, tok = start_model(cfg.init, vcfg, mesh, seed=cfg.seed)

`init` None: a fresh initialisation of `vcfg`, computed shard by shard on the mesh
(`hybridvlm.sharding.init_sharded`) with the built-in tokenizer its vocabulary is sized
for (config field `tokenizer`). Otherwise an HF or hybridvlm checkpoint directory holding a video VLM and its
tokenizer.json, loaded in float32 (the master weights) and placed on its shards.
"""

from __future__ import annotations

import json
import os
import tempfile

from flax import nnx
from jax.sharding import Mesh
from tokenizers import Tokenizer

from hybridvlm import checkpoint
from hybridvlm.config import ConfigError, LMConfig
from hybridvlm.radio import RadioConfig
from hybridvlm.hf_import import CheckpointError
from hybridvlm.loading import from_pretrained, is_vlm_checkpoint
from hybridvlm.sharding import init_sharded, shard_model
from hybridvlm.tokenizer import TOKENIZER_FILE, load_tokenizer, named_tokenizer
from hybridvlm.vlm import NemotronHVLModel, VLMConfig


def vlm_config(model_cfg, field: str = "--config.model") -> VLMConfig:
    """The VLMConfig of a config's `model` block (text, vision, image_token_id,
    projector_hidden_size, image_size). ConfigError naming `field` when invalid."""
    try:
        return VLMConfig(text=LMConfig(**model_cfg.text), vision=RadioConfig(**model_cfg.vision),
                         image_token_id=model_cfg.image_token_id,
                         projector_hidden_size=model_cfg.projector_hidden_size, image_size=model_cfg.image_size)
    except (ConfigError, TypeError, ValueError, AttributeError) as e:  # TypeError: an unknown field
        raise ConfigError(f"{field}: {e}") from None


def check_init(init: str | None, field: str = "--config.init") -> None:
    """Checks an init checkpoint without loading it: a directory with a video VLM and a
    tokenizer.json. CheckpointError / FileNotFoundError naming the field."""
    if init is None:
        return
    if not os.path.isdir(init):
        raise CheckpointError(f"{field}: {init}: no such directory")
    if not is_vlm_checkpoint(init):
        raise CheckpointError(f"{field}: {init}: not a video VLM checkpoint (a text-only LM cannot be "
                              "finetuned on video questions)")
    if not os.path.exists(os.path.join(init, TOKENIZER_FILE)):
        raise CheckpointError(f"{field}: {init}: no {TOKENIZER_FILE} next to the weights")


def start_model(init: str | None, vcfg: VLMConfig, mesh: Mesh, *, seed: int,
                tokenizer: str = "byte") -> tuple[NemotronHVLModel, Tokenizer]:
    """(model on its shards, float32; tokenizer). See the module docstring; `tokenizer`
    names the built-in tokenizer of a fresh model (`hybridvlm.tokenizer.TOKENIZERS`)."""
    if init is None:
        model = init_sharded(lambda: NemotronHVLModel(vcfg, rngs=nnx.Rngs(seed)), mesh)
        return model, named_tokenizer(tokenizer)
    check_init(init)
    tok = load_tokenizer(init)
    model = from_pretrained(init, dtype="float32")
    if not isinstance(model, NemotronHVLModel):
        raise CheckpointError(f"--config.init: {init}: loaded a {type(model).__name__}, not a video VLM")
    return shard_model(model, mesh), tok


TRAINING_FILE = "training.json"


def save_model(model: NemotronHVLModel, tokenizer: Tokenizer, directory: str, *, training: dict | None = None) -> None:
    """A hybridvlm checkpoint of `model` with its tokenizer.json (loadable by
    `hybridvlm.from_pretrained(directory)`), written whole or not at all.

    training: what produced it (step, config), stored beside as training.json."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [os.path.join(tmp, TOKENIZER_FILE)]
        tokenizer.save(files[0])
        if training is not None:
            files.append(os.path.join(tmp, TRAINING_FILE))
            with open(files[1], "w") as f:
                json.dump(training, f, indent=2)
        checkpoint.save(model, directory, extra_files=tuple(files))


def trained_step(directory: str) -> int | None:
    """The step a model saved by `save_model(..., training=...)` was trained to (None if unknown)."""
    try:
        with open(os.path.join(directory, TRAINING_FILE)) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
