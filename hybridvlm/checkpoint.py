"""Orbax checkpoints of hybridvlm models.

Layout of a checkpoint directory:
    hybridvlm_config.json   {"format": 1, "model": "NemotronHForCausalLM", "dtype": ..., "config": {...}}
    params/                 Orbax (StandardCheckpointer) tree of the NNX parameters
    tokenizer.json          optional, copied from the source checkpoint

`save` writes into a temporary sibling directory and renames it into place,
so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from hybridvlm.config import LMConfig
from hybridvlm.hf_import import CheckpointError
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

CONFIG_FILE = "hybridvlm_config.json"
PARAMS_DIR = "params"
FORMAT = 1
# Saved model class name -> (class, config class).
MODEL_CLASSES = {
    "NemotronHForCausalLM": (NemotronHForCausalLM, LMConfig),
    "NemotronHVLModel": (NemotronHVLModel, VLMConfig),
}


def is_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, CONFIG_FILE))


def save(model: NemotronHForCausalLM | NemotronHVLModel, directory: str, *, extra_files: tuple[str, ...] = ()) -> None:
    """Saves `model` (config + parameters) to a new directory `directory`.

    extra_files: paths copied next to the parameters (e.g. tokenizer.json).
    Raises FileExistsError if `directory` exists.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory}: output directory already exists")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        meta = {"format": FORMAT, "model": type(model).__name__, "dtype": model.dtype.name,
                "config": model.config.to_dict()}
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(tmp, PARAMS_DIR), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load(directory: str, *, dtype=None, **overrides) -> NemotronHForCausalLM | NemotronHVLModel:
    """Loads a checkpoint written by `save`; overrides change LMConfig fields."""
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint config ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT})")
    if meta.get("model") not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model class {meta.get('model')!r}")
    model_cls, config_cls = MODEL_CLASSES[meta["model"]]
    try:
        cfg = config_cls.from_dict(meta["config"])
        saved_dtype = jnp.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid checkpoint config ({e})") from None
    cfg = cfg.replace(**overrides) if overrides else cfg
    dtype = jnp.dtype(dtype or saved_dtype)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, saved_dtype), nnx.to_pure_dict(params))
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # Orbax raises several types for missing/corrupt data.
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    restored = jax.tree.map(lambda x: jnp.asarray(x, dtype), restored)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params, rest)
