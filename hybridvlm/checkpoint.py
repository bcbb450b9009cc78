"""Orbax checkpoints of hybridvlm models.

Layout of a checkpoint directory:
    hybridvlm_config.json   {"format": 2, "model": "NemotronHForCausalLM", "dtype": ..., "config": {...}}
    params/                 Orbax (StandardCheckpointer) tree of the NNX parameters
    tokenizer.json          optional, copied from the source checkpoint

Format 2 stores each Mamba mixer's input projection and conv one parameter
per part (`z_proj` ... `conv_C_bias`); format 1 stored them fused as HF does
(`in_proj`, `in_proj_bias`, `conv_weight`, `conv_bias`) and is converted on
load (the split is exact).

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
from jax.sharding import Mesh

from hybridvlm.config import LMConfig
from hybridvlm.hf_import import CheckpointError
from hybridvlm.layers.mamba2 import CONV_PARTS, PROJ_PARTS, split_conv, split_in_proj
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.sharding import param_shardings
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

CONFIG_FILE = "hybridvlm_config.json"
PARAMS_DIR = "params"
FORMAT = 2
FUSED_MAMBA_FORMAT = 1  # still read: Mamba in_proj / conv fused
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


def _dicts_with(tree, key: str):
    """The dicts holding `key` in a pure-dict parameter tree (e.g. every Mamba mixer's)."""
    if isinstance(tree, dict):
        if key in tree:
            yield tree
        else:
            for v in tree.values():
                yield from _dicts_with(v, key)


def _fuse_target(target: dict, cfg: LMConfig) -> None:
    """Turns the (split) target tree into format 1's, in place: per mixer, fused
    in_proj (d, proj) / in_proj_bias and conv_weight (k, conv_dim) / conv_bias."""
    for mixer in _dicts_with(target, "z_proj"):
        dtype = mixer["z_proj"].dtype
        has_bias, has_conv_bias = "z_proj_bias" in mixer, "conv_x_bias" in mixer
        split_names = [f"{p}_proj{b}" for p in PROJ_PARTS for b in ("", "_bias")]
        for name in split_names + [f"conv_{p}{b}" for p in CONV_PARTS for b in ("", "_bias")]:
            mixer.pop(name, None)
        proj = cfg.mamba_intermediate + cfg.conv_dim + cfg.mamba_num_heads
        mixer["in_proj"] = jax.ShapeDtypeStruct((cfg.hidden_size, proj), dtype)
        mixer["conv_weight"] = jax.ShapeDtypeStruct((cfg.conv_kernel, cfg.conv_dim), dtype)
        if has_bias:
            mixer["in_proj_bias"] = jax.ShapeDtypeStruct((proj,), dtype)
        if has_conv_bias:
            mixer["conv_bias"] = jax.ShapeDtypeStruct((cfg.conv_dim,), dtype)


def _split_restored(restored: dict, cfg: LMConfig) -> None:
    """Inverse of `_fuse_target` on the restored values, in place."""
    for mixer in _dicts_with(restored, "in_proj"):
        for name, split, key in (("in_proj", split_in_proj, "{}_proj"), ("in_proj_bias", split_in_proj, "{}_proj_bias"),
                                 ("conv_weight", split_conv, "conv_{}"), ("conv_bias", split_conv, "conv_{}_bias")):
            if name in mixer:
                for part, value in split(mixer.pop(name), cfg).items():
                    mixer[key.format(part)] = value


def load(directory: str, *, dtype=None, mesh: Mesh | None = None, **overrides
         ) -> NemotronHForCausalLM | NemotronHVLModel:
    """Loads a checkpoint written by `save`; overrides change LMConfig fields.

    mesh: None, or a device mesh: each parameter is restored onto its shards
      (`hybridvlm.sharding`'s rules).
    """
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read checkpoint config ({e})") from None
    if meta.get("format") not in (FORMAT, FUSED_MAMBA_FORMAT):
        raise CheckpointError(f"{path}: unsupported format {meta.get('format')!r} (expected {FORMAT} "
                              f"or {FUSED_MAMBA_FORMAT})")
    if meta.get("model") not in MODEL_CLASSES:
        raise CheckpointError(f"{path}: unknown model class {meta.get('model')!r}")
    model_cls, config_cls = MODEL_CLASSES[meta["model"]]
    try:
        cfg = config_cls.from_dict(meta["config"])
        saved_dtype = jnp.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid checkpoint config ({e})") from None
    cfg = cfg.replace(**overrides) if overrides else cfg
    text_cfg = cfg.text if isinstance(cfg, VLMConfig) else cfg
    dtype = jnp.dtype(dtype or saved_dtype)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    fused = meta["format"] == FUSED_MAMBA_FORMAT
    if mesh is None or fused:  # format 1 is split after the restore, then placed
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, saved_dtype), nnx.to_pure_dict(params))
    else:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, saved_dtype, sharding=s),
                              nnx.to_pure_dict(params), nnx.to_pure_dict(param_shardings(params, mesh)))
    if fused:
        _fuse_target(target, text_cfg)
    params_dir = os.path.join(os.path.abspath(directory), PARAMS_DIR)
    try:
        restored = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # Orbax raises several types for missing/corrupt data.
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if fused:
        _split_restored(restored, text_cfg)
    restored = jax.tree.map(lambda x: jnp.asarray(x, dtype), restored)
    nnx.replace_by_pure_dict(params, restored)
    if mesh is not None and fused:
        params = jax.device_put(params, param_shardings(params, mesh))
    return nnx.merge(graphdef, params, rest)
