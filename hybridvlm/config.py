"""Configuration of the Nemotron-H hybrid language model.

`LMConfig` is a frozen (hashable) dataclass, so it can be a static argument of
`jax.jit`. `LMConfig.from_hf` reads a Hugging Face `config.json` dict of the
`nemotron_h` family; `LMConfig.replace` applies user overrides and rejects
unknown field names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

# One character per layer, as in Nemotron-H's `hybrid_override_pattern`.
MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_CHARS = (MAMBA, ATTENTION, MLP, MOE)

# Names HF configs use in `layers_block_type` (transformers 4.x and 5.x spellings).
_HF_BLOCK_NAMES = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}

SSD_IMPLS = ("auto", "chunked", "sequential", "pallas")
# Matmul precision of the Pallas SSD kernels (hybridvlm.ssd.pallas.layout.PRECISIONS).
SSD_PRECISIONS = ("default", "highest")
# "cudnn" / "splash": library kernels for prompts (prefill, training); decoding
# against a cache uses "auto" (hybridvlm/ops/attention_library.py).
ATTENTION_IMPLS = ("auto", "blockwise", "naive", "cudnn", "splash")
# Defaults of the memory fields `LMConfig.ssd_chunk_group` (chunks per group of
# the chunked SSD) and `LMConfig.seq_block` (tokens per block of a long sequence).
SSD_CHUNK_GROUP = 32
SEQ_BLOCK = 16384


class ConfigError(ValueError):
    """A configuration field is missing, unknown or invalid."""


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Static description of a Nemotron-H style hybrid LM.

    Sizes follow HF `NemotronHConfig`. `pattern` holds one char per layer:
    `M` Mamba-2, `*` attention, `-` MLP, `E` MoE (not supported yet).
    """

    vocab_size: int
    hidden_size: int
    pattern: str
    # Attention.
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    rope_theta: float | None = None  # None: no positional encoding (Nemotron-H).
    # MLP (squared ReLU, no gate).
    intermediate_size: int = 0
    mlp_bias: bool = False
    # Mamba-2.
    mamba_num_heads: int = 0
    mamba_head_dim: int = 0
    ssm_state_size: int = 0
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False  # in_proj / out_proj bias of the Mamba mixer.
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    # Common.
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    # Implementation choices (do not change the math).
    ssd_impl: str = "auto"
    # Pallas SSD kernels' matmuls: "default" = bf16 passes on TPU, TF32 on GPU
    # (as XLA's matmuls at JAX's default); "highest" = float32 (slower).
    ssd_precision: str = "default"
    attention_impl: str = "auto"
    attention_block_q: int = 512
    attention_block_k: int = 512
    # Memory of long sequences (neither changes the math): the chunked SSD
    # runs its chunks in groups of `ssd_chunk_group` chunks (0: one group), and
    # the MLP, Mamba and attention layers run in blocks of about `seq_block`
    # tokens once a sequence is longer (0: never; balanced blocks, Mamba's
    # rounded up to whole chunks). See hybridvlm/ops/blocks.py.
    ssd_chunk_group: int = SSD_CHUNK_GROUP
    seq_block: int = SEQ_BLOCK

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_intermediate(self) -> int:
        """Width of the Mamba inner stream, heads * head_dim."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C."""
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    def layer_indices(self, kind: str) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.pattern) if c == kind)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, field: str, why: str):
            if not cond:
                raise ConfigError(f"LMConfig.{field}: {why}")

        need(self.vocab_size > 0, "vocab_size", f"must be positive, got {self.vocab_size}")
        need(self.hidden_size > 0, "hidden_size", f"must be positive, got {self.hidden_size}")
        need(len(self.pattern) > 0, "pattern", "needs at least one layer")
        bad = sorted(set(self.pattern) - set(LAYER_CHARS))
        need(not bad, "pattern", f"unknown layer chars {bad}; use M (Mamba-2), * (attention), - (MLP)")
        need(
            MOE not in self.pattern,
            "pattern",
            "MoE layers ('E') are not supported yet by hybridvlm",
        )
        need(self.ssd_impl in SSD_IMPLS, "ssd_impl", f"must be one of {SSD_IMPLS}, got {self.ssd_impl!r}")
        need(self.ssd_precision in SSD_PRECISIONS, "ssd_precision",
             f"must be one of {SSD_PRECISIONS}, got {self.ssd_precision!r}")
        need(self.ssd_chunk_group >= 0, "ssd_chunk_group", f"must be >= 0 (0: one group), got {self.ssd_chunk_group}")
        need(self.seq_block >= 0, "seq_block", f"must be >= 0 (0: no blocks), got {self.seq_block}")
        need(
            self.attention_impl in ATTENTION_IMPLS,
            "attention_impl",
            f"must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}",
        )
        if ATTENTION in self.pattern:
            for f in ("num_attention_heads", "num_key_value_heads", "head_dim"):
                need(getattr(self, f) > 0, f, "must be positive when the pattern has attention layers")
            need(
                self.num_attention_heads % self.num_key_value_heads == 0,
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
            )
            need(
                self.rope_theta is None or self.head_dim % 2 == 0,
                "head_dim",
                "must be even when rope_theta is set",
            )
            need(self.attention_block_q > 0 and self.attention_block_k > 0, "attention_block_q",
                 "attention block sizes must be positive")
        if MLP in self.pattern:
            need(self.intermediate_size > 0, "intermediate_size", "must be positive when the pattern has MLP layers")
        if MAMBA in self.pattern:
            for f in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size"):
                need(getattr(self, f) > 0, f, "must be positive when the pattern has Mamba layers")
            need(
                self.mamba_num_heads % self.n_groups == 0,
                "n_groups",
                f"{self.n_groups} does not divide mamba_num_heads={self.mamba_num_heads}",
            )
            lo, hi = self.time_step_limit
            need(0.0 <= lo <= hi, "time_step_limit", f"needs 0 <= low <= high, got {self.time_step_limit}")

    # ---------------------------------------------------------------- overrides
    def replace(self, **overrides: Any) -> "LMConfig":
        """Returns a copy with `overrides` applied; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(
                f"unknown LMConfig field(s) {unknown}; valid fields: {sorted(names)}"
            )
        if "eos_token_id" in overrides:
            overrides["eos_token_id"] = _as_int_tuple(overrides["eos_token_id"])
        if "time_step_limit" in overrides:
            overrides["time_step_limit"] = tuple(float(v) for v in overrides["time_step_limit"])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = list(d["time_step_limit"])
        d["eos_token_id"] = list(d["eos_token_id"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LMConfig":
        """Inverse of `to_dict` (used by Orbax checkpoints written by `convert`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown LMConfig field(s) {unknown} in saved config")
        d = dict(d)
        d["time_step_limit"] = tuple(float(v) for v in d.get("time_step_limit", (0.0, math.inf)))
        d["eos_token_id"] = _as_int_tuple(d.get("eos_token_id", ()))
        return cls(**d)

    # ------------------------------------------------------------------ HF import
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], source: str = "config.json") -> "LMConfig":
        """Builds a config from an HF `nemotron_h` config dict.

        Fields the model does not use are ignored (real configs carry many).
        Structural fields the present layer types need must be there; others
        take HF's defaults. `source` names the file in error messages.
        """

        def missing(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: missing field {field!r} ({why})")

        def get(field: str, why: str, *aliases: str):
            for name in (field, *aliases):
                if hf.get(name) is not None:
                    return hf[name]
            raise missing(field, why)

        pattern = _hf_pattern(hf, source)
        vocab_size = get("vocab_size", "embedding and LM head size")
        hidden_size = get("hidden_size", "model width")
        kw: dict[str, Any] = dict(vocab_size=int(vocab_size), hidden_size=int(hidden_size), pattern=pattern)

        if ATTENTION in pattern:
            heads = int(get("num_attention_heads", "the pattern has attention layers"))
            kw["num_attention_heads"] = heads
            kw["num_key_value_heads"] = int(hf.get("num_key_value_heads") or heads)
            kw["head_dim"] = int(get("head_dim", "the pattern has attention layers", "attention_head_dim"))
            if hf.get("rope_theta") is not None and hf.get("model_type") != "nemotron_h":
                kw["rope_theta"] = float(hf["rope_theta"])
        if MLP in pattern:
            kw["intermediate_size"] = int(get("intermediate_size", "the pattern has MLP layers"))
            act = hf.get("mlp_hidden_act", "relu2")
            if act != "relu2":
                raise ConfigError(f"{source}: mlp_hidden_act={act!r} is not supported (only 'relu2')")
            kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
        if MAMBA in pattern:
            why = "the pattern has Mamba layers"
            kw["mamba_num_heads"] = int(get("mamba_num_heads", why))
            kw["mamba_head_dim"] = int(get("mamba_head_dim", why))
            kw["ssm_state_size"] = int(get("ssm_state_size", why))
            kw["n_groups"] = int(get("n_groups", why, "mamba_n_groups"))
            kw["conv_kernel"] = int(hf.get("conv_kernel", hf.get("mamba_d_conv", 4)))
            kw["chunk_size"] = int(hf.get("chunk_size", hf.get("mamba_chunk_size", 128)))
            kw["use_conv_bias"] = bool(hf.get("use_conv_bias", hf.get("mamba_conv_bias", True)))
            kw["use_bias"] = bool(hf.get("use_bias", False))
            act = hf.get("mamba_hidden_act", "silu")
            if act != "silu":
                raise ConfigError(f"{source}: mamba_hidden_act={act!r} is not supported (only 'silu')")
            # The reference mixer clamps dt to (time_step_min, inf) and does not
            # read `time_step_limit`; we follow the reference.
            kw["time_step_limit"] = (float(hf.get("time_step_min", hf.get("mamba_dt_min", 0.001))), math.inf)
        kw["layer_norm_epsilon"] = float(hf.get("layer_norm_epsilon", 1e-5))
        kw["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", False))
        if hf.get("pad_token_id") is not None:
            kw["pad_token_id"] = int(hf["pad_token_id"])
        kw["bos_token_id"] = None if hf.get("bos_token_id") is None else int(hf["bos_token_id"])
        if "eos_token_id" in hf:
            kw["eos_token_id"] = _as_int_tuple(hf["eos_token_id"])
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _as_int_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _hf_pattern(hf: Mapping[str, Any], source: str) -> str:
    """Layer pattern from `layers_block_type` (list) or `hybrid_override_pattern` (str)."""
    blocks = hf.get("layers_block_type") or hf.get("layer_types")
    if blocks:
        try:
            return "".join(_HF_BLOCK_NAMES[b] for b in blocks)
        except KeyError as e:
            raise ConfigError(
                f"{source}: layers_block_type has unknown block type {e.args[0]!r}; "
                f"known: {sorted(_HF_BLOCK_NAMES)}"
            ) from None
    pattern = hf.get("hybrid_override_pattern")
    if pattern:
        bad = sorted(set(pattern) - set(LAYER_CHARS))
        if bad:
            raise ConfigError(f"{source}: hybrid_override_pattern has unknown chars {bad}")
        return str(pattern)
    raise ConfigError(
        f"{source}: missing field 'layers_block_type' (or 'hybrid_override_pattern'): "
        "the layer pattern is needed"
    )
