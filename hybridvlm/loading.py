"""`from_pretrained`: one entry point for HF directories and hybridvlm checkpoints."""

from __future__ import annotations

import json
import os

from jax.sharding import Mesh

from hybridvlm import checkpoint, hf_import, hf_vlm_import
from hybridvlm.shipped import resolve_checkpoint
from hybridvlm.hf_import import CheckpointError
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.vlm import NemotronHVLModel

HF_CONFIG_FILE = "config.json"
HYBRIDVLM = "hybridvlm"
HF = "hf"

def checkpoint_format(path: str) -> str:
    """"hybridvlm" (written by `python -m hybridvlm.convert`) or "hf"; reads no weights.

    Raises FileNotFoundError / NotADirectoryError if path is not a directory,
    CheckpointError if it holds neither kind of checkpoint.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such directory (expected an HF or hybridvlm checkpoint)")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: not a directory (expected an HF or hybridvlm checkpoint)")
    if checkpoint.is_checkpoint(path):
        return HYBRIDVLM
    if os.path.isfile(os.path.join(path, HF_CONFIG_FILE)):
        return HF
    raise CheckpointError(f"{path}: no checkpoint here: neither {HF_CONFIG_FILE} (HF) nor "
                          f"{checkpoint.CONFIG_FILE} (converted by python -m hybridvlm.convert)")


def is_vlm_checkpoint(path: str) -> bool:
    """Whether the checkpoint at `path` is a VLM (vision + text) rather than a text-only LM; reads no weights."""
    path = resolve_checkpoint(path)
    if checkpoint_format(path) == HYBRIDVLM:
        config = os.path.join(path, checkpoint.CONFIG_FILE)
        try:
            with open(config) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config}: cannot read checkpoint config ({e})") from None
        return meta.get("model") == NemotronHVLModel.__name__
    return hf_vlm_import.is_vlm_config(hf_import.read_hf_config(path))


def from_pretrained(path: str, dtype=None, *, mesh: Mesh | None = None, **overrides
                    ) -> NemotronHForCausalLM | NemotronHVLModel:
    """Loads a model from a local directory.

    Args:
      path: the name of a model shipped in the package (`hybridvlm.shipped.pretrained_names()`,
        e.g. "synth-video-qa-tiny"), or an HF directory (config.json + safetensors, single or sharded) of
        a Nemotron-H LM (`nemotron_h`) or VLM (`NemotronH_Omni_Reasoning_V3`:
        vision + text; an audio branch is skipped with a warning), or a
        hybridvlm Orbax checkpoint (written by `python -m hybridvlm.convert`).
      dtype: parameter/activation dtype; default the checkpoint's own.
      mesh: None (parameters on the default device), or a device mesh: the
        model is built abstractly and each tensor is placed straight onto its
        shards (`hybridvlm.sharding.param_shardings`), so no device ever
        holds the whole model.
      overrides: LMConfig fields to change, e.g. ssd_impl="sequential".
    Raises:
      FileNotFoundError / NotADirectoryError if path is not a directory;
      ConfigError / CheckpointError naming the field, tensor or file otherwise.
    """
    path = resolve_checkpoint(path)
    if checkpoint_format(path) == HYBRIDVLM:
        return checkpoint.load(path, dtype=dtype, mesh=mesh, **overrides)
    if hf_vlm_import.is_vlm_config(hf_import.read_hf_config(path)):
        return hf_vlm_import.load_hf_vlm(path, dtype=dtype, mesh=mesh, **overrides)
    return hf_import.load_hf_lm(path, dtype=dtype, mesh=mesh, **overrides)
