"""`from_pretrained`: one entry point for HF directories and hybridvlm checkpoints."""

from __future__ import annotations

import os

from hybridvlm import checkpoint, hf_import, hf_vlm_import
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.vlm import NemotronHVLModel


def from_pretrained(path: str, dtype=None, **overrides) -> NemotronHForCausalLM | NemotronHVLModel:
    """Loads a model from a local directory.

    Args:
      path: an HF directory (config.json + safetensors, single or sharded) of
        a Nemotron-H LM (`nemotron_h`) or VLM (`NemotronH_Omni_Reasoning_V3`:
        vision + text; an audio branch is skipped with a warning), or a
        hybridvlm Orbax checkpoint (written by `python -m hybridvlm.convert`).
      dtype: parameter/activation dtype; default the checkpoint's own.
      overrides: LMConfig fields to change, e.g. ssd_impl="sequential".
    Raises:
      FileNotFoundError if path is not a directory; ConfigError /
      CheckpointError naming the field, tensor or file otherwise.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected an HF or hybridvlm checkpoint)")
    if checkpoint.is_checkpoint(path):
        return checkpoint.load(path, dtype=dtype, **overrides)
    if hf_vlm_import.is_vlm_config(hf_import.read_hf_config(path)):
        return hf_vlm_import.load_hf_vlm(path, dtype=dtype, **overrides)
    return hf_import.load_hf_lm(path, dtype=dtype, **overrides)
