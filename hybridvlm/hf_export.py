"""Export to Hugging Face checkpoints: config.json + safetensors, as transformers saves them.

    export_hf(model, "out/")      # NemotronHForCausalLM or NemotronHVLModel

The tensors are the importer's rules inverted (`hybridvlm.hf_import.lm_rules`,
`hybridvlm.hf_vlm_import.radio_rules` / `projector_rules`), so what is
written is exactly what the import reads back: each rule's transform is a
pure re-indexing (transposes, reshapes, slices of a fused tensor), so
applying it to the HF tensor's flat indices tells where each parameter
element goes. Rules that read parts of one HF tensor (the Mamba mixer's
`in_proj` and `conv1d`, RADIO's fused `qkv`) fill it together, fusing the
parts again; every element must be written exactly once. A rule with several
sources is written in its last one: the layout transformers'
`save_pretrained` writes (the original NVIDIA names of the VLM:
`vision_model.radio_model.model.*`, `mlp1.*`).

config.json carries the keys transformers 5.24 writes for `nemotron_h` /
`nemotron_h_omni` / `radio` configs (as in tests/fixtures), the model's own
values where it has them and transformers' defaults for the rest.

Tied heads mirror the import: a model with its own head writes
`lm_head.weight` and `tie_word_embeddings: false`; a tied one writes no
head and `tie_word_embeddings: true` (which the import ties). transformers'
`NemotronHForCausalLM` never ties, so for it pass `tied_head_copy=True`: the
embedding is also written as `lm_head.weight` (imported back as an untied
head equal to the embedding: the same logits).

Large checkpoints are split into `model-0000k-of-0000n.safetensors` with a
`model.safetensors.index.json`. Everything is written into a temporary
directory next to `directory`, renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from hybridvlm.config import ATTENTION, MAMBA, MLP, LMConfig
from hybridvlm.hf_import import HEAD, INDEX_FILE, SINGLE_FILE, Source, TensorRule, lm_rules
from hybridvlm.hf_vlm_import import projector_rules, radio_rules
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.radio import RadioConfig
from hybridvlm.vlm import NemotronHVLModel, VLMConfig

# The transformers release whose save format (tensor names, config keys) this mirrors.
TRANSFORMERS_VERSION = "5.24.0"
MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
LM_PREFIX, VLM_LM_PREFIX, VLM_HEAD_PREFIX = "backbone.", "language_model.backbone.", "language_model."
SUMMARY_IDXS = "vision_model.radio_model.summary_idxs"  # a buffer HF saves with the tower
_HF_BLOCKS = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp"}
# transformers serialises float("inf") this way in config.json.
_INFINITY = {"__float__": "Infinity"}


# ------------------------------------------------------------------------------- config.json
def hf_lm_config(cfg: LMConfig, dtype) -> dict:
    """The `nemotron_h` config.json of an LM (text_config of a VLM, less
    `architectures` / `transformers_version`). Sizes of layer kinds the
    pattern lacks are left to transformers' defaults."""
    if cfg.rope_theta is not None:
        raise ValueError(f"LMConfig.rope_theta={cfg.rope_theta}: nemotron_h has no positional encoding, "
                         "so this model has no HF equivalent")
    hf = dict(
        attention_bias=False, attention_dropout=0.0, bos_token_id=cfg.bos_token_id, dtype=jax.numpy.dtype(dtype).name,
        eos_token_id=cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id) or None,
        expand=2, hidden_dropout=0.0, hidden_size=cfg.hidden_size, initializer_range=0.02,
        layer_norm_epsilon=cfg.layer_norm_epsilon, layers_block_type=[_HF_BLOCKS[c] for c in cfg.pattern],
        mamba_hidden_act="silu", mamba_proj_bias=False, mamba_ssm_cache_dtype="float32",
        max_position_embeddings=4096, mlp_bias=cfg.mlp_bias, mlp_hidden_act="relu2", model_type="nemotron_h",
        # MoE and MTP fields: transformers' defaults (no MoE layer; the VLM sets num_nextn_predict_layers).
        moe_intermediate_size=7688, moe_latent_size=None, moe_shared_expert_intermediate_size=7688,
        moe_shared_expert_overlap=True, mtp_layers_block_type=["full_attention", "moe"], n_group=1,
        n_routed_experts=8, n_shared_experts=1, norm_topk_prob=True, num_experts_per_tok=2, num_logits_to_keep=1,
        num_nextn_predict_layers=0, output_router_logits=False, pad_token_id=cfg.pad_token_id,
        rescale_prenorm_residual=True, residual_in_fp32=False, routed_scaling_factor=1.0, sliding_window=None,
        tie_word_embeddings=cfg.tie_word_embeddings, topk_group=1, use_bias=cfg.use_bias, use_cache=True,
        use_conv_bias=cfg.use_conv_bias, use_mamba_kernels=True, vocab_size=cfg.vocab_size,
    )
    if ATTENTION in cfg.pattern:
        hf.update(num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                  head_dim=cfg.head_dim)
    if MLP in cfg.pattern:
        hf.update(intermediate_size=cfg.intermediate_size)
    if MAMBA in cfg.pattern:
        lo, hi = cfg.time_step_limit
        # The reference clamps dt below at time_step_min (the import reads it as our lower limit)
        # and does not read time_step_limit; its upper end is kept there.
        hf.update(mamba_num_heads=cfg.mamba_num_heads, mamba_head_dim=cfg.mamba_head_dim,
                  ssm_state_size=cfg.ssm_state_size, n_groups=cfg.n_groups, conv_kernel=cfg.conv_kernel,
                  chunk_size=cfg.chunk_size, time_step_min=lo, time_step_limit=[0.0, _INFINITY if math.isinf(hi) else hi],
                  time_step_max=0.1, time_step_floor=1e-4)
    return dict(sorted(hf.items()))


def hf_radio_config(cfg: RadioConfig, dtype) -> dict:
    """The `radio` vision_config of a VLM."""
    tp = cfg.video_temporal_patch_size
    return dict(
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0, dtype=jax.numpy.dtype(dtype).name,
        hidden_act=cfg.hidden_act, hidden_dropout_prob=0.0, hidden_size=cfg.hidden_size, image_size=224,
        initializer_range=0.02, layer_norm_eps=cfg.layer_norm_eps, layerscale_value=1.0,
        max_img_size=cfg.max_img_size, mlp_ratio=cfg.mlp_ratio, model_type="radio", norm_mean=list(cfg.norm_mean),
        norm_std=list(cfg.norm_std), num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels,
        num_cls_tokens=cfg.num_cls_tokens, num_hidden_layers=cfg.num_layers, num_registers=cfg.num_registers,
        patch_dim=cfg.patch_dim, patch_size=cfg.patch_size, qkv_bias=cfg.qkv_bias,
        summary_idxs=list(cfg.summary_idxs), use_swiglu_ffn=cfg.use_swiglu_ffn,
        video_patch_dim=None if tp is None else tp * cfg.patch_dim, video_temporal_patch_size=tp,
    )


def hf_vlm_config(cfg: VLMConfig, dtype) -> dict:
    """The `nemotron_h_omni` config.json of a VLM (no audio branch)."""
    text = hf_lm_config(cfg.text, dtype)
    # transformers builds vision_final_layernorm exactly when the LM has MTP layers.
    text["num_nextn_predict_layers"] = 1 if cfg.vision_final_layernorm else 0
    return dict(
        architectures=["NemotronH_Omni_Reasoning_V3"], audio_config=None, audio_token_id=None,
        downsample_ratio=cfg.downsample_ratio, dtype=jax.numpy.dtype(dtype).name, force_image_size=cfg.image_size,
        image_token_id=cfg.image_token_id, model_type="nemotron_h_omni",
        projector_hidden_size=cfg.projector_hidden_size, text_config=text, transformers_version=TRANSFORMERS_VERSION,
        video_pruning_rate=cfg.video_pruning_rate, video_temporal_patch_size=cfg.temporal_patch_size,
        video_token_id=cfg.image_token_id, vision_config=hf_radio_config(cfg.vision, dtype),
        vision_hidden_size=cfg.vision.hidden_size,
    )


def hf_config(model: NemotronHForCausalLM | NemotronHVLModel, dtype) -> dict:
    """config.json of `model` saved in `dtype`."""
    if isinstance(model, NemotronHVLModel):
        return hf_vlm_config(model.config, dtype)
    return dict(architectures=["NemotronHForCausalLM"], **hf_lm_config(model.config, dtype),
                transformers_version=TRANSFORMERS_VERSION)


def _generation_config(cfg: LMConfig) -> dict:
    eos = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else list(cfg.eos_token_id) or None
    return {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id, "transformers_version": TRANSFORMERS_VERSION, "use_cache": True}


# ------------------------------------------------------------------------------- tensors
def export_rules(model: NemotronHForCausalLM | NemotronHVLModel, tied_head_copy: bool = False) -> list:
    """The import rules of `model`'s HF layout; `tied_head_copy` adds the
    embedding as `lm_head.weight` for a tied model."""
    if isinstance(model, NemotronHVLModel):
        cfg, prefix, head_prefix, at = model.config.text, VLM_LM_PREFIX, VLM_HEAD_PREFIX, ("language_model",)
    else:
        cfg, prefix, head_prefix, at = model.config, LM_PREFIX, "", ()
    rules = lm_rules(cfg, prefix=prefix, head_prefix=head_prefix, at=at)
    if cfg.tie_word_embeddings and tied_head_copy:
        shape = (cfg.vocab_size, cfg.hidden_size)  # HF's head is (vocab, d), as the embedding
        rules.append(TensorRule(at + ("embed",), (Source(head_prefix + HEAD, shape, lambda w: w),)))
    if isinstance(model, NemotronHVLModel):
        rules += radio_rules(model.config.vision, at=("vision",)) + projector_rules(model.config)
    return rules


def _plan(rules) -> dict[str, tuple[tuple[int, ...], list]]:
    """{HF name: (HF shape, [(parameter path, transform), ...])}, in rule order."""
    plan: dict = {}
    for r in rules:
        src = r.sources[-1]
        shape, parts = plan.setdefault(src.name, (src.shape, []))
        if shape != src.shape:
            raise ValueError(f"rules disagree on the shape of {src.name}: {shape} vs {src.shape}")
        parts.append((r.path, src.transform))
    return plan


def _assemble(name: str, shape, parts, params: dict, dtype) -> np.ndarray:
    """The HF tensor `name` from the parameters its rules read.

    Each transform moves elements only, so transform(flat indices) says which
    HF element each parameter element came from.
    """
    size = math.prod(shape)
    index = np.arange(size, dtype=np.int32 if size < 2**31 else np.int64).reshape(shape)
    out = np.empty(size, dtype)
    written = np.zeros(size, np.int8)
    for path, transform in parts:
        where = np.asarray(transform(index))
        value = params[path]
        if where.shape != value.shape:
            raise ValueError(f"{name}: parameter {'/'.join(map(str, path))} has shape {value.shape}, "
                             f"its rule gives {where.shape}")
        out[where.reshape(-1)] = value.reshape(-1)
        written[where.reshape(-1)] += 1
    if not np.all(written == 1):
        raise ValueError(f"{name}: the rules write {int(np.sum(written == 0))} elements never and "
                         f"{int(np.sum(written > 1))} more than once")
    return out.reshape(shape)


def _shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into files of at most `max_bytes` (a bigger tensor alone)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return shards + ([current] if current else [])


def export_hf(model: NemotronHForCausalLM | NemotronHVLModel, directory: str, *, dtype=None,
              max_shard_bytes: int = MAX_SHARD_BYTES, tied_head_copy: bool = False,
              extra_files: tuple[str, ...] = ()) -> list[str]:
    """Writes `model` as an HF checkpoint directory that `from_pretrained` and transformers load.

    Args:
      model: a NemotronHForCausalLM or NemotronHVLModel (parameters on any
        devices of this process; sharded ones are gathered tensor by tensor).
      directory: a new directory (FileExistsError if it exists).
      dtype: tensor dtype in the files (and config.json's); default the model's.
      max_shard_bytes: above this, the tensors go into several files + an index.
      tied_head_copy: a tied model also writes its embedding as lm_head.weight
        (for transformers, whose NemotronH never ties; see the module docstring).
      extra_files: copied into the directory (e.g. tokenizer.json).
    Returns:
      the safetensors file names written.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory):
        raise FileExistsError(f"{directory}: output directory already exists")
    dtype = np.dtype(jax.numpy.dtype(dtype or model.dtype))
    config = hf_config(model, dtype)
    text_cfg = model.config.text if isinstance(model, NemotronHVLModel) else model.config
    plan = _plan(export_rules(model, tied_head_copy))
    sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, _) in plan.items()}
    if isinstance(model, NemotronHVLModel):  # HF keeps the tower's summary indices as a stored buffer
        sizes[SUMMARY_IDXS] = 8 * len(model.config.vision.summary_idxs)
    groups = _shards(sizes, max_shard_bytes)
    files = ([SINGLE_FILE] if len(groups) == 1
             else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        for file, names in zip(files, groups):
            tensors = {}
            for name in names:
                if name == SUMMARY_IDXS:
                    tensors[name] = np.asarray(model.config.vision.summary_idxs, np.int64)
                    continue
                shape, parts = plan[name]
                # Only this file's parameters come to the host, one at a time.
                host = {path: np.asarray(jax.device_get(params[path].get_value()), dtype) for path, _ in parts}
                tensors[name] = _assemble(name, shape, parts, host, dtype)
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(sizes.values()),
                                  "total_parameters": sum(math.prod(s) for s, _ in plan.values())},
                     "weight_map": {name: file for file, names in zip(files, groups) for name in names}}
            _write_json(os.path.join(tmp, INDEX_FILE), index)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), _generation_config(text_cfg))
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

