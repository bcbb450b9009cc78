"""HF export (`hybridvlm.hf_export`, `python -m hybridvlm.convert --to-hf`).

A model imported from a golden HF fixture (written by transformers'
`save_pretrained`) exports to the fixture's own tensors (names, shapes,
dtypes, values) and config.json; the export loads back with identical
parameters and logits. Fresh models (tied head, biases, bfloat16) round
trip too, large exports split into indexed files, and the CLI's errors are
one line.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import hybridvlm
from hybridvlm import cli, convert, hf_export
from hybridvlm.hf_export import export_hf
from hybridvlm.lm import NemotronHForCausalLM
from tests.conftest import tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# Audio tensors: the fixture's branch that hybridvlm does not load, so cannot export.
NOT_EXPORTED = ("sound_encoder.", "sound_projection.")


def _tensors(directory):
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def _params(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def _logits(models, *args, **kw):
    """Each model's logits from one compiled forward (the models share a structure)."""
    graphdef = nnx.graphdef(models[0])
    fwd = jax.jit(lambda state, *a: nnx.merge(graphdef, state)(*a, **kw))
    return [np.asarray(fwd(nnx.state(m), *args)) for m in models]


def _assert_matches_fixture(fixture, exported, *, untied_from_stored_head=False):
    """The exported directory holds the fixture's tensors and config.json."""
    want, got = _tensors(fixture), _tensors(exported)
    assert sorted(got) == sorted(k for k in want if not k.startswith(NOT_EXPORTED))
    for name, value in got.items():
        assert (value.dtype, value.shape) == (want[name].dtype, want[name].shape), name
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    with open(os.path.join(fixture, "config.json")) as f:
        want_cfg = json.load(f)
    with open(os.path.join(exported, "config.json")) as f:
        got_cfg = json.load(f)
    if untied_from_stored_head:  # a stored head is imported as the model's own head (as the reference)
        assert want_cfg["tie_word_embeddings"] and not got_cfg["tie_word_embeddings"]
        got_cfg["tie_word_embeddings"] = True
    if "audio_config" in want_cfg and want_cfg["audio_config"]:  # not supported: exported without it
        want_cfg.update(audio_config=None, audio_token_id=None)
    assert got_cfg == want_cfg


@pytest.mark.parametrize("case", ["hybrid_g2", "tied_g1_sharded"])
def test_lm_from_the_golden_fixture_exports_to_its_tensors_and_loads_back_identically(case, tmp_path):
    fixture = os.path.join(FIXTURES, "nemotron_h", case)
    model = hybridvlm.from_pretrained(fixture)
    out = str(tmp_path / "hf")
    assert export_hf(model, out) == ["model.safetensors"]
    _assert_matches_fixture(fixture, out, untied_from_stored_head=case == "tied_g1_sharded")
    back = hybridvlm.from_pretrained(out)
    assert back.config == model.config
    _assert_same_params(back, model)
    ids = jnp.asarray(np.load(os.path.join(fixture, "expected.npz"))["input_ids"])
    a, b = _logits([model, back], ids)
    np.testing.assert_array_equal(a, b)


def test_vlm_from_the_golden_fixtures_exports_to_their_tensors_and_loads_back_identically(tmp_path):
    for i, case in enumerate(("omni_video", "omni_video_vision_norm", "omni_video_audio")):
        fixture = os.path.join(FIXTURES, "vlm", case)
        model = hybridvlm.from_pretrained(fixture)
        out = str(tmp_path / f"hf{i}")
        export_hf(model, out)
        _assert_matches_fixture(fixture, out)
        back = hybridvlm.from_pretrained(out)
        assert back.config == model.config
        _assert_same_params(back, model)
    e = np.load(os.path.join(FIXTURES, "vlm", "omni_video", "expected.npz"))
    model, back = hybridvlm.from_pretrained(os.path.join(FIXTURES, "vlm", "omni_video")), \
        hybridvlm.from_pretrained(str(tmp_path / "hf0"))
    a, b = _logits([model, back], jnp.asarray(e["input_ids"]), pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_array_equal(a, b)


def test_fresh_tied_lm_with_biases_round_trips_in_bfloat16_and_large_exports_split(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, use_bias=True, mlp_bias=True, eos_token_id=(2, 5))
    # Distinct random values everywhere (biases included, so each part's place in the fused
    # tensors is checked), set on the abstract model: an eager init compiles op by op.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(7)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), state))
    out = str(tmp_path / "hf")
    files = export_hf(model, out, max_shard_bytes=20_000)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == files and "lm_head.weight" not in weight_map  # tied: no head
    back = hybridvlm.from_pretrained(out)
    assert back.config == cfg
    _assert_same_params(back, model)

    # bfloat16 files, config and model.
    low = str(tmp_path / "bf16")
    export_hf(model, low, dtype=jnp.bfloat16)
    assert {v.dtype.name for v in _tensors(low).values()} == {"bfloat16"}
    with open(os.path.join(low, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    back = hybridvlm.from_pretrained(low)
    assert back.dtype == jnp.bfloat16
    low_params = _params(back)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(low_params[k], v.astype(jnp.bfloat16), err_msg=k)

    # For transformers (never ties): the embedding also written as the head, imported as an equal own head.
    copy = str(tmp_path / "copy")
    export_hf(model, copy, tied_head_copy=True)
    tensors = _tensors(copy)
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["backbone.embeddings.weight"])
    untied = hybridvlm.from_pretrained(copy)
    assert not untied.config.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(untied.lm_head[...]), np.asarray(model.embed[...]).T)

    with pytest.raises(FileExistsError):
        export_hf(model, out)


def test_convert_exports_a_project_checkpoint_with_its_tokenizer(tmp_path):
    fixture = os.path.join(FIXTURES, "nemotron_h", "hybrid_g2")
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert convert.main(["--hf", fixture, "--out", ckpt]) == 0
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    assert convert.main(["--to-hf", "--checkpoint", ckpt, "--out", hf]) == 0
    _assert_matches_fixture(fixture, hf)
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf"]


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_argparse(convert.main, argv)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return e.value.code, err


def test_convert_export_errors_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch):
    code, err = _cli(["--to-hf", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "--checkpoint" in err and "missing" in err
    (tmp_path / "taken").mkdir()
    fixture = os.path.join(FIXTURES, "nemotron_h", "hybrid_g2")
    code, err = _cli(["--to-hf", "--checkpoint", fixture, "--out", str(tmp_path / "taken")], capsys)
    assert code == 2 and "--out" in err and "already exists" in err
    code, err = _cli(["--to-hf", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--checkpoint" in err
    code, err = _cli(["--to-hf", "--hf", fixture, "--checkpoint", fixture, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--hf" in err
    code, err = _cli(["--to-hf", "--checkpoint", fixture, "--out", str(tmp_path / "o"), "--max-shard-size", "big"],
                     capsys)
    assert code == 2 and "--max-shard-size" in err

    # A failure while writing leaves neither the output nor a temporary directory.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "model.safetensors")

    monkeypatch.setattr(hf_export, "save_file", disk_full)
    code, err = _cli(["--to-hf", "--checkpoint", fixture, "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and "No space left" in err
    assert sorted(os.listdir(tmp_path)) == ["taken"]
