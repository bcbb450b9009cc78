"""LMConfig: validation messages, HF import, serialisation."""

from __future__ import annotations

import json
import math
import re

import pytest

from conftest import tiny_config
from hybridvlm.config import ConfigError, LMConfig


def hf_dict(**extra):
    """A minimal HF nemotron_h config with Mamba, attention and MLP layers."""
    d = {
        "model_type": "nemotron_h",
        "vocab_size": 128,
        "hidden_size": 48,
        "hybrid_override_pattern": "M-M*-",
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 96,
        "mamba_num_heads": 6,
        "mamba_head_dim": 8,
        "ssm_state_size": 16,
        "n_groups": 3,
        "chunk_size": 16,
        "conv_kernel": 3,
        "layer_norm_epsilon": 1e-6,
        "eos_token_id": 7,
        "pad_token_id": 5,
    }
    d.update(extra)
    return d


# --------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------
def test_tiny_config_has_all_layer_kinds():
    cfg = tiny_config()
    assert set(cfg.pattern) == {"M", "*", "-"}
    assert cfg.mamba_num_heads % cfg.n_groups == 0 and cfg.n_groups > 1


def test_replace_unknown_field_names_it():
    with pytest.raises(ConfigError, match=r"\['foo'\]"):
        tiny_config().replace(foo=1)
    with pytest.raises(ConfigError, match="hiden_size"):
        tiny_config(hiden_size=16)


def test_replace_valid_field():
    cfg = tiny_config().replace(hidden_size=16, eos_token_id=[3, 4], time_step_limit=[0.01, 10])
    assert cfg.hidden_size == 16 and cfg.eos_token_id == (3, 4) and cfg.time_step_limit == (0.01, 10.0)
    assert tiny_config().hidden_size == 32  # frozen: the original is untouched
    hash(cfg)  # usable as a static jit argument


def test_moe_pattern_refused():
    with pytest.raises(ConfigError, match=r"(?i)pattern.*MoE.*not supported yet"):
        tiny_config(pattern="M*E-")


def test_unknown_pattern_char_refused():
    with pytest.raises(ConfigError, match=r"pattern.*\['X'\]"):
        tiny_config(pattern="M*X")


@pytest.mark.parametrize("overrides,field", [
    (dict(n_groups=3), "n_groups"),                       # 3 does not divide 4 heads
    (dict(num_key_value_heads=3), "num_key_value_heads"),  # 3 does not divide 4 heads
    (dict(ssd_impl="triton"), "ssd_impl"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(mamba_head_dim=0), "mamba_head_dim"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(head_dim=7, rope_theta=10_000.0), "head_dim"),
    (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_invalid_field_is_named(overrides, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        tiny_config(**overrides)


def test_bad_ssd_impl_lists_choices():
    with pytest.raises(ConfigError) as e:
        tiny_config(ssd_impl="triton")
    msg = str(e.value)
    assert "'triton'" in msg and all(name in msg for name in ("auto", "chunked", "sequential", "pallas"))


def test_fields_of_absent_layer_kinds_are_not_required():
    cfg = LMConfig(vocab_size=8, hidden_size=8, pattern="--", intermediate_size=16)
    assert cfg.mamba_num_heads == 0 and cfg.num_attention_heads == 0
    with pytest.raises(ConfigError, match="mamba_num_heads"):
        cfg.replace(pattern="M-")


# --------------------------------------------------------------------------
# HF import.
# --------------------------------------------------------------------------
def test_from_hf_override_pattern():
    cfg = LMConfig.from_hf(hf_dict())
    assert cfg.pattern == "M-M*-"
    assert (cfg.vocab_size, cfg.hidden_size) == (128, 48)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (6, 2, 8)
    assert (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups) == (6, 8, 16, 3)
    assert (cfg.chunk_size, cfg.conv_kernel, cfg.intermediate_size) == (16, 3, 96)
    assert cfg.layer_norm_epsilon == 1e-6
    assert cfg.eos_token_id == (7,) and cfg.pad_token_id == 5
    assert cfg.rope_theta is None  # Nemotron-H has no positional encoding


@pytest.mark.parametrize("names", [
    ["mamba", "mlp", "mamba", "attention", "mlp"],
    ["linear_attention", "mlp", "linear_attention", "full_attention", "mlp"],
])
def test_from_hf_layers_block_type(names):
    d = hf_dict(layers_block_type=names)
    del d["hybrid_override_pattern"]
    assert LMConfig.from_hf(d).pattern == "M-M*-"


def test_from_hf_block_list_wins_over_override_pattern():
    cfg = LMConfig.from_hf(hf_dict(layers_block_type=["attention", "mlp"]))
    assert cfg.pattern == "*-"


def test_from_hf_unknown_block_type():
    d = hf_dict(layers_block_type=["mamba", "cross_attention"])
    with pytest.raises(ConfigError, match="cross_attention"):
        LMConfig.from_hf(d, source="some/dir/config.json")


def test_from_hf_moe_refused():
    with pytest.raises(ConfigError, match="(?i)MoE.*not supported yet"):
        LMConfig.from_hf(hf_dict(hybrid_override_pattern="M*E"))


@pytest.mark.parametrize("field", ["mamba_head_dim", "hidden_size", "vocab_size", "num_attention_heads",
                                   "intermediate_size", "ssm_state_size"])
def test_from_hf_missing_field_names_field_and_file(field):
    d = hf_dict()
    del d[field]
    with pytest.raises(ConfigError) as e:
        LMConfig.from_hf(d, source="ckpt/config.json")
    msg = str(e.value)
    assert f"'{field}'" in msg or re.search(rf"\b{field}\b", msg), msg
    assert "ckpt/config.json" in msg


def test_from_hf_missing_pattern():
    d = hf_dict()
    del d["hybrid_override_pattern"]
    with pytest.raises(ConfigError, match=r"(?s)ckpt/config\.json.*(layers_block_type|hybrid_override_pattern)"):
        LMConfig.from_hf(d, source="ckpt/config.json")


def test_from_hf_fields_of_absent_layers_may_be_missing():
    d = hf_dict(hybrid_override_pattern="*-*-")
    for f in ("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups"):
        del d[f]
    cfg = LMConfig.from_hf(d)
    assert cfg.pattern == "*-*-" and cfg.mamba_num_heads == 0


def test_from_hf_invalid_values_name_file_and_field():
    with pytest.raises(ConfigError, match=r"(?s)ckpt/config\.json.*n_groups"):
        LMConfig.from_hf(hf_dict(n_groups=4), source="ckpt/config.json")  # 4 does not divide 6


def test_from_hf_ignores_unrelated_fields():
    extra = dict(architectures=["NemotronHForCausalLM"], moe_intermediate_size=7688, n_routed_experts=8,
                 max_position_embeddings=4096, torch_dtype="bfloat16", some_future_field={"a": [1]})
    assert LMConfig.from_hf(hf_dict(**extra)) == LMConfig.from_hf(hf_dict())


# --------------------------------------------------------------------------
# Serialisation.
# --------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    cfg = tiny_config(eos_token_id=(2, 9), rope_theta=500.0, bos_token_id=None,
                      time_step_limit=(0.001, math.inf))
    d = cfg.to_dict()
    assert d["hidden_size"] == 32 and d["pattern"] == "M-*M*-"
    assert LMConfig.from_dict(d) == cfg
    # ...also through JSON (lists instead of tuples, Infinity).
    back = LMConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg and back.eos_token_id == (2, 9) and back.time_step_limit == (0.001, math.inf)
    assert back != tiny_config()


def test_from_dict_unknown_field():
    d = tiny_config().to_dict()
    d["bogus_field"] = 1
    with pytest.raises(ConfigError, match="bogus_field"):
        LMConfig.from_dict(d)


def test_ssd_precision_is_checked_and_reaches_the_pallas_kernels(monkeypatch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from conftest import tiny_config
    from hybridvlm import NemotronHForCausalLM
    import hybridvlm.ssd as ssd_module

    with pytest.raises(ConfigError, match="ssd_precision"):
        tiny_config(ssd_precision="fast")
    seen = []
    real = ssd_module.ssd_pallas

    def spy(*args, **kwargs):
        seen.append(kwargs.get("precision"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssd_module, "ssd_pallas", spy)
    model = NemotronHForCausalLM(tiny_config(pattern="M", ssd_impl="pallas", ssd_precision="highest"),
                                 rngs=nnx.Rngs(0))
    jax.eval_shape(lambda ids: model(ids), jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert seen == ["highest"]
