"""Import of HF `NemotronH_Omni_Reasoning_V3` VLM checkpoints (vision + projector + text).

Tensor names follow transformers 5 (`vision_model.embeddings...`,
`vision_model.encoder.layer.N...`, `multi_modal_projector...`,
`language_model.{backbone,model}...`); the original RADIO / Nemotron VL
layout (`vision_model.radio_model.model.patch_generator...`, fused
`attn.qkv`, `mlp1.{0,1,3}`) is accepted as well. An audio branch, if the
checkpoint has one, is not loaded: audio is not supported.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from hybridvlm.hf_import import (
    Source, SafetensorsSet, TensorRule, build_model, head_as_reference, hf_dtype, lm_prefixes, lm_rules,
    open_weights, read_hf_config, read_tensors, sharded_placer,
)
from hybridvlm.radio import RadioConfig, RadioVisionModel
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

log = logging.getLogger(__name__)

VISION = "vision_model."
LEGACY_VISION = "vision_model.radio_model.model."
OMNI_MODEL_TYPES = ("nemotron_h_omni", "NemotronH_Omni_Reasoning_V3")


def is_vlm_config(hf: dict) -> bool:
    return hf.get("model_type") in OMNI_MODEL_TYPES or "vision_config" in hf


def _same(w):
    return w


def _t(w):
    return w.T


def radio_rules(cfg: RadioConfig, at: tuple, prefix: str = VISION, legacy_prefix: str = LEGACY_VISION
                ) -> list[TensorRule]:
    """Every tensor of the RADIO tower: transformers-5 module names under
    `prefix`, or the original RADIO names under `legacy_prefix` (what
    `save_pretrained` writes, and what released checkpoints carry)."""
    d, f, side = cfg.hidden_size, cfg.mlp_hidden, cfg.table_side
    pe = lambda w: w.reshape(side, side, d)

    def two(path, new, legacy, shape, fn=_same, **kw):
        return TensorRule(at + path, (Source(prefix + new, shape, fn), Source(legacy_prefix + legacy, shape, fn)), **kw)

    rules = [
        two(("patch_projection",), "embeddings.patch_projection.weight", "patch_generator.embedder.weight",
            (d, cfg.patch_dim), _t),
        two(("position_embedding",), "embeddings.position_embedding", "patch_generator.pos_embed",
            (1, side * side, d), pe),
        two(("cls_register_token",), "embeddings.cls_register_token", "patch_generator.cls_token.token",
            (cfg.num_prefix_tokens, d)),
    ]
    if cfg.video_temporal_patch_size:
        rules.append(two(("video_patch_projection",), "embeddings.video_patch_projection.weight",
                         "patch_generator.video_embedder.weight",
                         (d, cfg.video_temporal_patch_size * cfg.patch_dim), _t))
    for i in range(cfg.num_layers):
        new, old, bp = f"encoder.layer.{i}.", f"blocks.{i}.", ("blocks", i)
        for norm in ("norm1", "norm2"):
            rules += [two(bp + (norm, "weight"), new + f"{norm}.weight", old + f"{norm}.weight", (d,)),
                      two(bp + (norm, "bias"), new + f"{norm}.bias", old + f"{norm}.bias", (d,))]
        for j, name in enumerate("qkv"):
            chunk = lambda w, j=j: w[j * d:(j + 1) * d]
            rules.append(TensorRule(at + bp + (name, "w"), (
                Source(prefix + new + f"attention.{name}_proj.weight", (d, d), _t),
                Source(legacy_prefix + old + "attn.qkv.weight", (3 * d, d), lambda w, c=chunk: c(w).T))))
            if cfg.qkv_bias:
                rules.append(TensorRule(at + bp + (name, "b"), (
                    Source(prefix + new + f"attention.{name}_proj.bias", (d,), _same),
                    Source(legacy_prefix + old + "attn.qkv.bias", (3 * d,), chunk))))
        rules += [two(bp + ("o", "w"), new + "attention.o_proj.weight", old + "attn.proj.weight", (d, d), _t),
                  two(bp + ("o", "b"), new + "attention.o_proj.bias", old + "attn.proj.bias", (d,))]
        # C-RADIO has no LayerScale; checkpoints without it get the identity.
        ones = lambda: jnp.ones((d,))
        rules += [two(bp + (f"scale{k}",), new + f"layer_scale{k}.lambda1", old + f"layer_scale{k}.lambda1", (d,),
                      default=ones) for k in (1, 2)]
        if cfg.use_swiglu_ffn:
            mlp = (("gate", "mlp.gate_proj", (f, d)), ("fc1", "mlp.up_proj", (f, d)), ("fc2", "mlp.down_proj", (d, f)))
        else:
            mlp = (("fc1", "mlp.fc1", (f, d)), ("fc2", "mlp.fc2", (d, f)))
        for ours, hf_name, shape in mlp:
            rules += [two(bp + (ours, "w"), new + hf_name + ".weight", old + hf_name + ".weight", shape, _t),
                      two(bp + (ours, "b"), new + hf_name + ".bias", old + hf_name + ".bias", (shape[0],))]
    return rules


def projector_rules(cfg: VLMConfig) -> list[TensorRule]:
    din = cfg.vision.hidden_size * cfg.merge**2
    hid, dout = cfg.projector_hidden_size, cfg.text.hidden_size
    rules = [
        TensorRule(("projector", "norm", "weight"), (Source("multi_modal_projector.layer_norm.weight", (din,), _same),
                                                     Source("mlp1.0.weight", (din,), _same))),
        TensorRule(("projector", "linear_1"), (Source("multi_modal_projector.linear_1.weight", (hid, din), _t),
                                               Source("mlp1.1.weight", (hid, din), _t))),
        TensorRule(("projector", "linear_2"), (Source("multi_modal_projector.linear_2.weight", (dout, hid), _t),
                                               Source("mlp1.3.weight", (dout, hid), _t))),
    ]
    if cfg.vision_final_layernorm:
        d = cfg.vision.hidden_size
        for part in ("weight", "bias"):
            rules.append(TensorRule(("vision_norm", part), (
                Source(f"vision_final_layernorm.{part}", (d,), _same),
                Source(f"vision_projector.vision_final_layernorm.{part}", (d,), _same))))
    return rules


def load_hf_vlm(directory: str, *, dtype=None, mesh: Mesh | None = None, **overrides) -> NemotronHVLModel:
    """Loads an HF Nemotron-H Omni directory (vision + text) into NemotronHVLModel.

    mesh: None, or a device mesh to place each parameter on its shards
      (as `hybridvlm.hf_import.load_hf_lm`).
    overrides: VLMConfig fields, or LMConfig fields of the text model.
    """
    hf = read_hf_config(directory)
    source = os.path.join(directory, "config.json")
    if hf.get("audio_config") or hf.get("sound_config"):
        log.warning("%s: this checkpoint has an audio branch; audio is not supported by hybridvlm, "
                    "only its vision and text parts are loaded", source)
    cfg = VLMConfig.from_hf(hf, source)
    dtype = jnp.dtype(dtype or hf_dtype(hf) or hf_dtype(hf.get("text_config") or {}) or jnp.float32)
    weights = open_weights(directory, mesh)
    prefix, head_prefix = lm_prefixes(weights.keys())
    if "tie_word_embeddings" not in overrides:
        # As the reference: a stored language_model.lm_head.weight is the head, tied flag or not.
        cfg = dataclasses.replace(cfg, text=head_as_reference(cfg.text, weights.keys(), head_prefix, directory))
    cfg = cfg.replace(**overrides) if overrides else cfg
    rules = (lm_rules(cfg.text, prefix=prefix, head_prefix=head_prefix, at=("language_model",))
             + radio_rules(cfg.vision, at=("vision",)) + projector_rules(cfg))
    # Audio branch (not supported) and buffers the model derives from config.
    skipped = ("audio_tower.", "embed_audio.", "sound_encoder.", "sound_projection.", "vision_model.radio_model.summary_idxs",
               "vision_model.summary_idxs", "vision_model.radio_model.input_conditioner.", "vision_model.input_conditioner.")
    factory = lambda: NemotronHVLModel(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    place = None if mesh is None else sharded_placer(factory, mesh, dtype)
    values = read_tensors(weights, rules, dtype, ignore=skipped, place=place)
    return build_model(factory, values, dtype)


def load_hf_radio(directory: str, *, dtype=None) -> RadioVisionModel:
    """Loads a standalone HF `radio` checkpoint (RadioModel, with its input conditioner)."""
    hf = read_hf_config(directory)
    cfg = RadioConfig.from_hf(hf, os.path.join(directory, "config.json"))
    dtype = jnp.dtype(dtype or hf_dtype(hf) or jnp.float32)
    weights = SafetensorsSet(directory)
    values = read_tensors(weights, radio_rules(cfg, at=(), prefix="", legacy_prefix="radio_model.model."), dtype,
                          ignore=("radio_model.input_conditioner.", "radio_model.summary_idxs", "input_conditioner.",
                                  "summary_idxs"))
    return build_model(lambda: RadioVisionModel(cfg, rngs=nnx.Rngs(0), dtype=dtype), values, dtype)
