"""Checkpoint import, Orbax conversion round trip, tokenizer, and bad-input errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import hybridvlm
from hybridvlm import convert
from hybridvlm.config import ConfigError
from hybridvlm.hf_import import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nemotron_h")
SINGLE = os.path.join(FIXTURES, "hybrid_g2")
SHARDED = os.path.join(FIXTURES, "tied_g1_sharded")


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def _params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _edit_config(directory, fn):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        text = f.read()
    # HF writes infinity as {"__float__": "Infinity"}; plain json keeps it as a dict.
    cfg = json.loads(text)
    fn(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


# ---------------------------------------------------------------- happy paths
def test_from_pretrained_overrides_reach_config():
    model = hybridvlm.from_pretrained(SINGLE, ssd_impl="sequential", attention_impl="blockwise")
    assert model.config.ssd_impl == "sequential"
    assert model.config.attention_impl == "blockwise"
    assert model.config.pattern == "M-M*-M*-"


def test_dtype_argument_casts_parameters():
    model = hybridvlm.from_pretrained(SINGLE, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(_params(model))} == {jnp.dtype(jnp.bfloat16)}
    logits = model(jnp.ones((1, 5), jnp.int32))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 5, 256)


def test_convert_round_trip_is_identical(tmp_path):
    src = _copy(SHARDED, tmp_path, "hf")
    _make_tokenizer(os.path.join(src, "tokenizer.json"))
    out = str(tmp_path / "converted")
    assert convert.main(["--hf", src, "--out", out]) == 0
    a, b = hybridvlm.from_pretrained(src), hybridvlm.from_pretrained(out)
    pa, pb = _params(a), _params(b)
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)
    assert a.config == b.config
    ids = jnp.arange(3, 15, dtype=jnp.int32)[None]
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))
    tok = hybridvlm.load_tokenizer(out)
    assert tok is not None and tok.encode("hello world").ids == [1, 2]
    # Overrides also reach the config of an Orbax checkpoint.
    assert hybridvlm.from_pretrained(out, ssd_impl="sequential").config.ssd_impl == "sequential"


def test_load_tokenizer_absent_and_corrupt(tmp_path):
    assert hybridvlm.load_tokenizer(str(tmp_path)) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        hybridvlm.load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------ bad input
def test_unknown_override_is_named():
    with pytest.raises(ConfigError, match="no_such_field"):
        hybridvlm.from_pretrained(SINGLE, no_such_field=3)


def test_missing_needed_hf_field_is_named(tmp_path):
    d = _copy(SINGLE, tmp_path)
    _edit_config(d, lambda c: c.pop("mamba_head_dim"))
    with pytest.raises(ConfigError, match=r"config.json.*mamba_head_dim"):
        hybridvlm.from_pretrained(d)


def test_unused_hf_fields_are_ignored(tmp_path):
    d = _copy(SINGLE, tmp_path)
    _edit_config(d, lambda c: c.update(some_future_field=[1, 2], n_routed_experts=None))
    assert hybridvlm.from_pretrained(d).config.vocab_size == 256


def test_moe_layers_are_refused_clearly(tmp_path):
    d = _copy(SINGLE, tmp_path)
    _edit_config(d, lambda c: c["layers_block_type"].__setitem__(1, "moe"))
    with pytest.raises(ConfigError, match="MoE.*not supported yet"):
        hybridvlm.from_pretrained(d)


def test_tensor_shape_mismatch_is_named(tmp_path):
    d = _copy(SINGLE, tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    name = "backbone.layers.3.mixer.k_proj.weight"
    tensors[name] = tensors[name][:-8]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(24, 64\).*\(32, 64\)"):
        hybridvlm.from_pretrained(d)


def test_config_that_disagrees_with_weights_is_named(tmp_path):
    d = _copy(SINGLE, tmp_path)
    _edit_config(d, lambda c: c.update(ssm_state_size=32))
    with pytest.raises(CheckpointError, match=r"in_proj\.weight.*shape"):
        hybridvlm.from_pretrained(d)


def test_missing_tensor_is_named(tmp_path):
    d = _copy(SINGLE, tmp_path)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["backbone.norm_f.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="norm_f.weight.*missing"):
        hybridvlm.from_pretrained(d)


def test_missing_shard_is_named(tmp_path):
    d = _copy(SHARDED, tmp_path)
    shard = "model-00003-of-00005.safetensors"
    os.remove(os.path.join(d, shard))
    with pytest.raises(CheckpointError, match=shard):
        hybridvlm.from_pretrained(d)


def test_truncated_file_is_named(tmp_path):
    d = _copy(SINGLE, tmp_path)
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        hybridvlm.from_pretrained(d)


def test_missing_weights_and_config(tmp_path):
    d = _copy(SINGLE, tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no weights found"):
        hybridvlm.from_pretrained(d)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        hybridvlm.from_pretrained(d)
    with pytest.raises(FileNotFoundError):
        hybridvlm.from_pretrained(str(tmp_path / "nowhere"))


def test_failed_convert_leaves_nothing(tmp_path):
    d = _copy(SHARDED, tmp_path, "hf")
    os.remove(os.path.join(d, "model-00002-of-00005.safetensors"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError):
        convert.main(["--hf", d, "--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["hf"], "convert left partial output behind"


def test_convert_refuses_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit):
        convert.main(["--hf", SINGLE, "--out", str(out)])
    assert os.listdir(out) == []


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    from hybridvlm import checkpoint

    model = hybridvlm.from_pretrained(SINGLE)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoint.shutil, "copy2", boom)
    (tmp_path / "tok.json").write_text("{}")
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(model, str(tmp_path / "out"), extra_files=(str(tmp_path / "tok.json"),))
    assert sorted(os.listdir(tmp_path)) == ["tok.json"]


def test_bfloat16_checkpoint_loads_in_its_dtype(tmp_path):
    from safetensors.flax import load_file as load_jax, save_file as save_jax

    d = _copy(SINGLE, tmp_path)
    path = os.path.join(d, "model.safetensors")
    f32 = load_jax(path)
    save_jax({k: v.astype(jnp.bfloat16) for k, v in f32.items()}, path, metadata={"format": "pt"})
    _edit_config(d, lambda c: c.update(dtype="bfloat16"))
    model = hybridvlm.from_pretrained(d)
    assert model.embed[...].dtype == jnp.bfloat16
    want = np.asarray(f32["backbone.layers.3.mixer.q_proj.weight"].astype(jnp.bfloat16).astype(jnp.float32))
    got = np.asarray(model.layers[3].mixer.q[...].astype(jnp.float32))
    np.testing.assert_array_equal(got.reshape(64, -1).T, want)
    # float32 on request: the bf16 values, widened exactly.
    wide = hybridvlm.from_pretrained(d, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(wide.layers[3].mixer.q[...]).reshape(64, -1).T, want)
