"""Import of Hugging Face `nemotron_h` checkpoints (config.json + safetensors), no torch.

The HF tensor names (`backbone.layers.3.mixer.in_proj.weight`, or `model.`
for transformers 5 saves) are mapped onto the NNX parameter tree with a
layout transform each (PyTorch `Linear` weights are (out, in); ours are
einsum-ready (in, ..., out)). Every tensor's shape is checked against the
config before it is used, and nothing is returned until all are loaded.
A stored `lm_head.weight` is always the head, as in the reference (see
`head_as_reference`).

One HF tensor may feed several parameters: the Mamba mixer's fused
`in_proj` (columns [z | x | B | C | dt]) and `conv1d` ([x | B | C]) are
split at import into one parameter per part, each by its own rule slicing
its part (`hybridvlm.layers.mamba2.split_in_proj`). The rules are also the
export's spec (`hybridvlm.hf_export`), which inverts them.

With `mesh=`, every tensor is read on the host and placed straight onto its
shards (`jax.make_array_from_callback`, the rule table of
`hybridvlm.sharding`): no device ever holds the whole model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open

from hybridvlm.config import ATTENTION, MAMBA, MLP, LMConfig
from hybridvlm.layers.mamba2 import CONV_PARTS, PROJ_PARTS, split_conv, split_in_proj
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.sharding import param_shardings

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Prefixes under which checkpoints of this family store the LM.
LM_PREFIXES = ("backbone.", "model.", "language_model.backbone.", "language_model.model.")
HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated or of the wrong shape."""


@dataclass(frozen=True)
class Source:
    """One way to find a parameter in a checkpoint: a full tensor name, its
    expected shape there, and the transform into our layout."""

    name: str
    shape: tuple[int, ...]
    transform: Callable[[jax.Array], jax.Array]


@dataclass(frozen=True)
class TensorRule:
    """How one NNX parameter is read: the first source present in the
    checkpoint wins (current names first, legacy layouts after: the last is
    the layout transformers' `save_pretrained` writes, which export writes);
    `default` builds the value when no source is present (e.g. an identity
    LayerScale that older checkpoints do not store), else the tensor is
    required. Several rules may read one tensor (a part each)."""

    path: tuple
    sources: tuple[Source, ...]
    default: Callable[[], jax.Array] | None = None


def rule(path, name, shape, transform=lambda w: w, **kw) -> TensorRule:
    return TensorRule(tuple(path), (Source(name, tuple(shape), transform),), **kw)


def _t(w):
    return w.T


def lm_rules(cfg: LMConfig, *, prefix: str, head_prefix: str, at: tuple = ()) -> list[TensorRule]:
    """Every tensor of the LM: HF names under `prefix` (`lm_head` under
    `head_prefix`), NNX paths under `at`, HF shapes and transforms."""
    d, v = cfg.hidden_size, cfg.vocab_size
    r = lambda path, name, shape, fn=lambda w: w: rule(at + path, prefix + name, shape, fn)
    rules = [r(("embed",), "embeddings.weight", (v, d)), r(("final_norm", "weight"), "norm_f.weight", (d,))]
    for i, kind in enumerate(cfg.pattern):
        pre, lp = f"layers.{i}.", ("layers", i)
        rules.append(r(lp + ("norm", "weight"), pre + "norm.weight", (d,)))
        mix, mp = pre + "mixer.", lp + ("mixer",)
        if kind == MAMBA:
            h, inner, c, k = cfg.mamba_num_heads, cfg.mamba_intermediate, cfg.conv_dim, cfg.conv_kernel
            proj = inner + c + h
            # One rule per part of the fused tensors (read once: `read_tensors` reuses the last tensor).
            proj_part = lambda part: (lambda w: split_in_proj(w, cfg, only=(part,))[part])
            conv_part = lambda part: (lambda w: split_conv(w, cfg, only=(part,))[part])
            rules += [r(mp + (f"{p}_proj",), mix + "in_proj.weight", (proj, d), lambda w, p=p: proj_part(p)(w.T))
                      for p in PROJ_PARTS]
            rules += [r(mp + (f"conv_{p}",), mix + "conv1d.weight", (c, 1, k),
                        lambda w, p=p: conv_part(p)(w[:, 0, :].T)) for p in CONV_PARTS]
            rules += [
                r(mp + ("dt_bias",), mix + "dt_bias", (h,)),
                r(mp + ("A_log",), mix + "A_log", (h,)),
                r(mp + ("D",), mix + "D", (h,)),
                r(mp + ("norm", "weight"), mix + "norm.weight", (inner,)),
                r(mp + ("out_proj",), mix + "out_proj.weight", (d, inner), _t),
            ]
            if cfg.use_conv_bias:
                rules += [r(mp + (f"conv_{p}_bias",), mix + "conv1d.bias", (c,), conv_part(p)) for p in CONV_PARTS]
            if cfg.use_bias:
                rules += [r(mp + (f"{p}_proj_bias",), mix + "in_proj.bias", (proj,), proj_part(p))
                          for p in PROJ_PARTS]
                rules.append(r(mp + ("out_proj_bias",), mix + "out_proj.bias", (d,)))
        elif kind == ATTENTION:
            n, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            split_out = lambda heads: (lambda w: rearrange(w, "(n h) d -> d n h", n=heads))
            rules += [
                r(mp + ("q",), mix + "q_proj.weight", (n * hd, d), split_out(n)),
                r(mp + ("k",), mix + "k_proj.weight", (kv * hd, d), split_out(kv)),
                r(mp + ("v",), mix + "v_proj.weight", (kv * hd, d), split_out(kv)),
                r(mp + ("o",), mix + "o_proj.weight", (d, n * hd), lambda w: rearrange(w, "d (n h) -> n h d", n=n)),
            ]
        elif kind == MLP:
            f = cfg.intermediate_size
            rules += [r(mp + ("up",), mix + "up_proj.weight", (f, d), _t),
                      r(mp + ("down",), mix + "down_proj.weight", (d, f), _t)]
            if cfg.mlp_bias:
                rules += [r(mp + ("up_bias",), mix + "up_proj.bias", (f,)),
                          r(mp + ("down_bias",), mix + "down_proj.bias", (d,))]
    if not cfg.tie_word_embeddings:
        rules.append(rule(at + ("lm_head",), head_prefix + HEAD, (v, d), _t))
    return rules


def head_as_reference(cfg: LMConfig, keys, head_prefix: str, directory: str) -> LMConfig:
    """`cfg` with `tie_word_embeddings` saying whether a separate head is loaded.

    transformers' NemotronHForCausalLM (5.24) never ties its head to the
    embedding, whatever config.json's `tie_word_embeddings` says: its
    `_tied_weights_keys` is empty and `save_pretrained` writes both tensors.
    So a stored `lm_head.weight` is the head (untied), as there. A checkpoint
    without one ties when its config says so (the reference would start
    from a random head, which nothing can use); with
    `tie_word_embeddings: false` a missing head is an error naming it.
    Callers skip this when the user overrides `tie_word_embeddings`.
    """
    name = head_prefix + HEAD
    if name in keys:
        return cfg.replace(tie_word_embeddings=False)
    if cfg.tie_word_embeddings:
        return cfg
    raise CheckpointError(
        f"{directory}: tensor {name!r} is missing from the checkpoint and config.json has "
        "tie_word_embeddings=false; pass tie_word_embeddings=True to use the embedding as the head."
    )


class SafetensorsSet:
    """A single-file or sharded safetensors checkpoint, opened lazily.

    framework: "flax" (tensors as JAX arrays on the default device) or
    "numpy" (host arrays, bfloat16 included: for placing onto shards).
    """

    def __init__(self, directory: str, framework: str = "flax"):
        self.directory = directory
        self.framework = framework
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
                self._handles[path] = safe_open(path, framework=self.framework)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file ({e}); is it truncated?") from None
        return self._handles[path]

    def keys(self):
        return self.file_of.keys()

    def get(self, name: str) -> jax.Array:
        """The tensor `name` in its stored dtype (bf16 included), as a JAX or numpy array."""
        path = self.file_of[name]
        handle = self._open(path)
        try:
            value = handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); is the file truncated?") from None
        except Exception as e:  # safetensors raises plain exceptions for a missing key
            raise CheckpointError(f"{path}: tensor {name!r} is not in the file ({e})") from None
        return value


def lm_prefixes(keys) -> tuple[str, str]:
    """(prefix of the LM backbone, prefix of its `lm_head`) among `keys`.

    `lm_head` is a sibling of `backbone.`/`model.`, not inside it.
    """
    keys = list(keys)
    for prefix in LM_PREFIXES:
        if any(k.startswith(prefix + "layers.") for k in keys):
            return prefix, prefix[: prefix.rstrip(".").rfind(".") + 1]
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


def read_tensors(weights: "SafetensorsSet", rules: list[TensorRule], dtype, ignore: tuple[str, ...] = (),
                 place: Callable | None = None) -> dict:
    """Reads, checks and transforms every rule's tensor: {path: array in dtype}.

    place: place(path, value) -> the parameter's array; default: a JAX array
    in `dtype` on the default device (see `sharded_placer`).
    Tensors no rule uses are reported in a warning, except names starting
    with one of `ignore` (branches deliberately not loaded).
    """
    place = place or (lambda path, value: jnp.asarray(value, dtype))
    values = {}
    last_name, w = None, None
    for r in rules:
        src = next((s for s in r.sources if s.name in weights.file_of), None)
        if src is None:
            if r.default is None:
                names = " or ".join(repr(s.name) for s in r.sources)
                raise CheckpointError(f"{weights.directory}: tensor {names} is missing from the checkpoint "
                                      "(config needs it)")
            values[r.path] = place(r.path, r.default())
            continue
        if src.name != last_name:  # consecutive rules reading parts of one tensor read it once
            w, last_name = weights.get(src.name), src.name
            if tuple(w.shape) != src.shape:
                raise CheckpointError(
                    f"{weights.file_of[src.name]}: tensor {src.name!r} has shape {tuple(w.shape)}, "
                    f"but config.json implies {src.shape}"
                )
        # Cast per tensor so peak memory stays near the model's size in `dtype`.
        values[r.path] = place(r.path, src.transform(w))
    used = {s.name for r in rules for s in r.sources}
    extra = [k for k in weights.keys() if k not in used and not k.startswith(ignore)]
    if extra:
        log.warning("%s: %d tensors not used by the model, e.g. %s", weights.directory, len(extra), extra[:3])
    return values


def sharded_placer(factory, mesh: Mesh, dtype) -> Callable:
    """`read_tensors`' place(path, host value) for a model laid out on `mesh`.

    Each parameter goes straight onto its shards (its NamedSharding from the
    rule table of `hybridvlm.sharding`): `jax.make_array_from_callback`
    copies each addressable device's slice of the host array, so a device
    holds only its shards, and each process only its own devices' (multi-host).
    """
    shardings = dict(nnx.to_flat_state(param_shardings(nnx.state(nnx.eval_shape(factory)), mesh)))

    def place(path, value):
        host = np.asarray(value, dtype)
        return jax.make_array_from_callback(host.shape, shardings[path], lambda index: host[index])

    return place


def open_weights(directory: str, mesh: Mesh | None) -> "SafetensorsSet":
    """The checkpoint's tensors: on the host for a sharded load, else as JAX arrays."""
    return SafetensorsSet(directory, framework="flax" if mesh is None else "numpy")


def load_hf_lm(directory: str, *, dtype=None, mesh: Mesh | None = None, **overrides) -> NemotronHForCausalLM:
    """Loads an HF Nemotron-H causal LM directory into a NemotronHForCausalLM.

    Args:
      directory: holds config.json and model.safetensors (or shards + index).
      dtype: parameter dtype; default the checkpoint's dtype, else float32.
      mesh: None (parameters on the default device), or a device mesh: each
        parameter is placed on its shards by `hybridvlm.sharding`'s rules.
      overrides: LMConfig fields to change (e.g. ssd_impl="sequential").
    Raises:
      ConfigError for config problems, CheckpointError for file/tensor problems.
    """
    hf = read_hf_config(directory)
    cfg = LMConfig.from_hf(hf, source=os.path.join(directory, "config.json"))
    dtype = jnp.dtype(dtype or hf_dtype(hf) or jnp.float32)
    weights = open_weights(directory, mesh)
    prefix, head_prefix = lm_prefixes(weights.keys())
    if "tie_word_embeddings" not in overrides:
        cfg = head_as_reference(cfg, weights.keys(), head_prefix, directory)
    cfg = cfg.replace(**overrides) if overrides else cfg
    factory = lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    place = None if mesh is None else sharded_placer(factory, mesh, dtype)
    values = read_tensors(weights, lm_rules(cfg, prefix=prefix, head_prefix=head_prefix), dtype, place=place)
    return build_model(factory, values, dtype)


def build_model(factory, values: dict, dtype):
    """Creates `factory()` abstractly and fills every parameter from `values`.

    values: {state path tuple: array}; must cover every parameter exactly.
    Arrays already in `dtype` are used as they are (their sharding kept).
    """
    graphdef, state = nnx.split(nnx.eval_shape(factory))
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
