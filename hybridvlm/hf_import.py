"""Import of Hugging Face `nemotron_h` checkpoints (config.json + safetensors), no torch.

The HF tensor names (`backbone.layers.3.mixer.in_proj.weight`, or `model.`
for transformers 5 saves) are mapped onto the NNX parameter tree with a
layout transform each (PyTorch `Linear` weights are (out, in); ours are
einsum-ready (in, ..., out)). Every tensor's shape is checked against the
config before it is used, and nothing is returned until all are loaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from safetensors import SafetensorError, safe_open

from hybridvlm.config import ATTENTION, MAMBA, MLP, ConfigError, LMConfig
from hybridvlm.lm import NemotronHForCausalLM

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Prefixes under which checkpoints of this family store the LM.
LM_PREFIXES = ("backbone.", "model.", "language_model.backbone.", "language_model.model.")


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated or of the wrong shape."""


@dataclass(frozen=True)
class TensorRule:
    """How one HF tensor becomes one NNX parameter."""

    hf_name: str  # without the LM prefix ("lm_head." names sit beside the backbone)
    path: tuple  # path in the NNX state
    hf_shape: tuple[int, ...]
    transform: Callable[[jax.Array], jax.Array]


def _t(w):
    return w.T


def lm_rules(cfg: LMConfig) -> list[TensorRule]:
    """All tensors a config needs, with their HF shapes and transforms."""
    d, v = cfg.hidden_size, cfg.vocab_size
    rules = [
        TensorRule("embeddings.weight", ("embed",), (v, d), lambda w: w),
        TensorRule("norm_f.weight", ("final_norm", "weight"), (d,), lambda w: w),
    ]
    for i, kind in enumerate(cfg.pattern):
        pre, at = f"layers.{i}.", ("layers", i)
        rules.append(TensorRule(pre + "norm.weight", at + ("norm", "weight"), (d,), lambda w: w))
        mix, mp = pre + "mixer.", at + ("mixer",)
        if kind == MAMBA:
            h, inner, c, k = cfg.mamba_num_heads, cfg.mamba_intermediate, cfg.conv_dim, cfg.conv_kernel
            proj = inner + c + h
            rules += [
                TensorRule(mix + "in_proj.weight", mp + ("in_proj",), (proj, d), _t),
                TensorRule(mix + "conv1d.weight", mp + ("conv_weight",), (c, 1, k), lambda w: w[:, 0, :].T),
                TensorRule(mix + "dt_bias", mp + ("dt_bias",), (h,), lambda w: w),
                TensorRule(mix + "A_log", mp + ("A_log",), (h,), lambda w: w),
                TensorRule(mix + "D", mp + ("D",), (h,), lambda w: w),
                TensorRule(mix + "norm.weight", mp + ("norm", "weight"), (inner,), lambda w: w),
                TensorRule(mix + "out_proj.weight", mp + ("out_proj",), (d, inner), _t),
            ]
            if cfg.use_conv_bias:
                rules.append(TensorRule(mix + "conv1d.bias", mp + ("conv_bias",), (c,), lambda w: w))
            if cfg.use_bias:
                rules += [
                    TensorRule(mix + "in_proj.bias", mp + ("in_proj_bias",), (proj,), lambda w: w),
                    TensorRule(mix + "out_proj.bias", mp + ("out_proj_bias",), (d,), lambda w: w),
                ]
        elif kind == ATTENTION:
            n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            split_out = lambda heads: (lambda w: rearrange(w, "(n h) d -> d n h", n=heads))
            rules += [
                TensorRule(mix + "q_proj.weight", mp + ("q",), (n * hd, d), split_out(n)),
                TensorRule(mix + "k_proj.weight", mp + ("k",), (kv * hd, d), split_out(kv)),
                TensorRule(mix + "v_proj.weight", mp + ("v",), (kv * hd, d), split_out(kv)),
                TensorRule(mix + "o_proj.weight", mp + ("o",), (d, n * hd),
                           lambda w: rearrange(w, "d (n h) -> n h d", n=n)),
            ]
        elif kind == MLP:
            f = cfg.intermediate_size
            rules += [
                TensorRule(mix + "up_proj.weight", mp + ("up",), (f, d), _t),
                TensorRule(mix + "down_proj.weight", mp + ("down",), (d, f), _t),
            ]
            if cfg.mlp_bias:
                rules += [
                    TensorRule(mix + "up_proj.bias", mp + ("up_bias",), (f,), lambda w: w),
                    TensorRule(mix + "down_proj.bias", mp + ("down_bias",), (d,), lambda w: w),
                ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), (v, d), _t))
    return rules


class SafetensorsSet:
    """A single-file or sharded safetensors checkpoint, opened lazily."""

    def __init__(self, directory: str):
        self.directory = directory
        self._handles: dict[str, object] = {}
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self.file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self.file_of = {k: single for k in self._open(single).keys()}
        else:
            raise CheckpointError(
                f"{directory}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})"
            )

    def _open(self, path: str):
        if path not in self._handles:
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: weight file is missing")
            try:
                self._handles[path] = safe_open(path, framework="flax")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated?") from None
        return self._handles[path]

    def keys(self):
        return self.file_of.keys()

    def get(self, name: str) -> jax.Array:
        """The tensor `name` as a JAX array in its stored dtype (bf16 included)."""
        path = self.file_of[name]
        handle = self._open(path)
        try:
            value = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); is the file truncated?") from None
        except Exception as e:  # safetensors raises plain exceptions for a missing key
            raise CheckpointError(f"{path}: tensor {name!r} is not in the file ({e})") from None
        return value


def _lm_prefix(keys) -> str:
    keys = list(keys)
    for prefix in LM_PREFIXES:
        if any(k.startswith(prefix + "layers.") for k in keys):
            return prefix
    raise CheckpointError(
        f"no language-model tensors found: expected names starting with one of {LM_PREFIXES} "
        f"followed by 'layers.'; first names seen: {keys[:5]}"
    )


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: config.json is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def hf_dtype(hf: dict):
    """The checkpoint's dtype from config.json (`dtype` or `torch_dtype`), or None."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return None if name is None else jnp.dtype(str(name).replace("torch.", ""))


def load_hf_lm(directory: str, *, dtype=None, **overrides) -> NemotronHForCausalLM:
    """Loads an HF Nemotron-H causal LM directory into a NemotronHForCausalLM.

    Args:
      directory: holds config.json and model.safetensors (or shards + index).
      dtype: parameter dtype; default the checkpoint's dtype, else float32.
      overrides: LMConfig fields to change (e.g. ssd_impl="sequential").
    Raises:
      ConfigError for config problems, CheckpointError for file/tensor problems.
    """
    hf = read_hf_config(directory)
    cfg = LMConfig.from_hf(hf, source=os.path.join(directory, "config.json"))
    cfg = cfg.replace(**overrides) if overrides else cfg
    dtype = jnp.dtype(dtype or hf_dtype(hf) or jnp.float32)
    weights = SafetensorsSet(directory)
    prefix = _lm_prefix(weights.keys())
    # `lm_head` is a sibling of `backbone.`/`model.`, not inside it.
    head_prefix = prefix[: prefix.rstrip(".").rfind(".") + 1]
    full_name = lambda r: (head_prefix if r.hf_name.startswith("lm_head.") else prefix) + r.hf_name
    values = {}
    for rule in lm_rules(cfg):
        name = full_name(rule)
        if name not in weights.file_of:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing from the checkpoint (config needs it)")
        w = weights.get(name)
        if tuple(w.shape) != rule.hf_shape:
            raise CheckpointError(
                f"{weights.file_of[name]}: tensor {name!r} has shape {tuple(w.shape)}, "
                f"but config.json implies {rule.hf_shape}"
            )
        # Cast per tensor so peak memory stays near the model's size in `dtype`.
        values[rule.path] = jnp.asarray(rule.transform(w), dtype)
    used = {full_name(r) for r in lm_rules(cfg)}
    extra = [k for k in weights.keys() if k.startswith(prefix) and k not in used]
    if extra:
        log.warning("%s: %d tensors not used by the model, e.g. %s", directory, len(extra), extra[:3])
    return build_model(cfg, values, dtype)


def build_model(cfg: LMConfig, values: dict, dtype) -> NemotronHForCausalLM:
    """Creates the model abstractly and fills every parameter from `values`.

    values: {state path tuple: array}; must cover every parameter exactly.
    """
    abstract = nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    missing = sorted(set(flat) - set(values), key=str)
    unexpected = sorted(set(values) - set(flat), key=str)
    if missing or unexpected:
        raise CheckpointError(f"parameter mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for path, var in flat.items():
        expected = var.get_value().shape
        got = values[path].shape
        if tuple(got) != tuple(expected):
            raise CheckpointError(f"parameter {'.'.join(map(str, path))}: shape {got} != expected {expected}")
        var.set_value(jnp.asarray(values[path], dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
