"""Parity of the RADIO tower and the video VLM with HF transformers' `RadioModel`
and `NemotronH_Omni_Reasoning_V3`, on golden fixtures from
tests/fixtures/make_vlm_fixtures.py; plus VLM import variants and errors."""

import json
import logging
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import hybridvlm
from hybridvlm import convert
from hybridvlm.hf_vlm_import import load_hf_radio
from hybridvlm.radio import resize_bilinear
from hybridvlm.vlm import NemotronHVLModel, pixel_shuffle

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "vlm")
TOL = 1e-4


def _case(name):
    d = os.path.join(FIXTURES, name)
    return d, dict(np.load(os.path.join(d, "expected.npz")))


# ------------------------------------------------------------------ RADIO
@pytest.mark.parametrize("suffix", ["", "_square", "_large"])
def test_radio_features_match_reference(suffix):
    d, e = _case("radio_image")
    model = load_hf_radio(d)
    out = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(e["pixel_values" + suffix]))
    for key in ("features", "summary", "last_hidden_state"):
        np.testing.assert_allclose(np.asarray(out[key]), e[key + suffix], atol=TOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("grid", ["5x7", "8x8", "10x10"])
def test_position_embedding_interpolation_matches_reference(grid):
    d, e = _case("radio_image")
    rows, cols = map(int, grid.split("x"))
    got = load_hf_radio(d).position_embeddings(rows, cols)
    np.testing.assert_allclose(np.asarray(got), e[f"pos_embed_{grid}"].reshape(rows * cols, -1), atol=1e-5, rtol=0)


def _torch_bilinear_numpy(table, side):
    """torch F.interpolate(mode="bilinear", align_corners=False) of (n, n, d) to (side, side, d),
    point by point: source coordinate (i + 0.5) n / side - 0.5, clamped below at 0; the upper
    neighbour clamped at n - 1. Written independently of the code under test."""
    n = table.shape[0]
    out = np.zeros((side, side, table.shape[2]), np.float64)

    def neighbours(i):
        src = max((i + 0.5) * n / side - 0.5, 0.0)
        lo = min(int(np.floor(src)), n - 1)
        return lo, min(lo + 1, n - 1), src - lo

    for y in range(side):
        y0, y1, fy = neighbours(y)
        for x in range(side):
            x0, x1, fx = neighbours(x)
            top = (1 - fx) * table[y0, x0] + fx * table[y0, x1]
            bottom = (1 - fx) * table[y1, x0] + fx * table[y1, x1]
            out[y, x] = (1 - fy) * top + fy * bottom
    return out


@pytest.mark.parametrize("n,side", [(8, 5), (8, 3), (8, 13), (6, 16), (7, 7)],
                         ids=["down5", "down3", "up13", "up16", "same"])
def test_position_table_resize_is_torch_bilinear(n, side):
    # Downsampling is where jax.image.resize's default antialiasing would differ from torch.
    table = np.random.default_rng(n * 100 + side).normal(size=(n, n, 3)).astype(np.float32)
    got = np.asarray(resize_bilinear(jnp.asarray(table), side))
    np.testing.assert_allclose(got, _torch_bilinear_numpy(table.astype(np.float64), side), atol=1e-5, rtol=0)


def test_position_table_resize_hand_values():
    # A table holding its row index, so each output row shows its 1-D weights:
    # 4 -> 2 averages pairs (0.5, 2.5); 2 -> 4 gives 0, 0.25, 0.75, 1 (edges clamped).
    rows = lambda n: np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, n, 1))
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(rows(4)), 2))[:, 0, 0], [0.5, 2.5])
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(rows(2)), 4))[:, 0, 0], [0, 0.25, 0.75, 1])


def test_pixel_shuffle_layout():
    x = np.arange(4 * 6 * 2).reshape(1, 4, 6, 2)
    y = np.asarray(pixel_shuffle(jnp.asarray(x), 2))
    assert y.shape == (1, 2, 3, 8)
    # token (a, b) = [x(2a, 2b), x(2a, 2b+1), x(2a+1, 2b), x(2a+1, 2b+1)], channels innermost.
    for a in range(2):
        for b in range(3):
            want = np.concatenate([x[0, 2 * a, 2 * b], x[0, 2 * a, 2 * b + 1], x[0, 2 * a + 1, 2 * b], x[0, 2 * a + 1, 2 * b + 1]])
            np.testing.assert_array_equal(y[0, a, b], want)


# -------------------------------------------------------------------- VLM
@pytest.mark.parametrize("case", ["omni_video", "omni_video_vision_norm"])
def test_video_features_and_logits_match_reference(case):
    d, e = _case(case)
    model = hybridvlm.from_pretrained(d)
    assert isinstance(model, NemotronHVLModel)
    pv = jnp.asarray(e["pixel_values_videos"])
    np.testing.assert_allclose(np.asarray(model.video_features(pv)), e["vision_features"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.video_embeddings(pv)), e["video_embeds"], atol=TOL, rtol=0)
    logits = nnx.jit(lambda m, i, p: m(i, pixel_values_videos=p))(model, jnp.asarray(e["input_ids"]), pv)
    np.testing.assert_allclose(np.asarray(logits), e["logits"], atol=TOL, rtol=0)


def test_greedy_answer_matches_reference():
    d, e = _case("omni_video")
    model = hybridvlm.from_pretrained(d)
    out = model.generate(e["input_ids"], max_new_tokens=20, stop_tokens=(),
                         pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_array_equal(np.asarray(out), e["greedy_tokens"])


def test_audio_branch_is_skipped_with_a_warning(caplog):
    d, e = _case("omni_video_audio")
    with caplog.at_level(logging.WARNING):
        model = hybridvlm.from_pretrained(d)
    assert any("audio is not supported" in r.getMessage() for r in caplog.records)
    assert not any("not used by the model" in r.getMessage() for r in caplog.records)
    logits = model(jnp.asarray(e["input_ids"]), pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_allclose(np.asarray(logits), e["logits"], atol=TOL, rtol=0)


def _to_module_names(tensors):
    """Rewrites the saved (original RADIO / Nemotron VL) names to transformers-5
    module names, splitting the fused qkv: the other layout the loader accepts."""
    out = {}
    for k, v in tensors.items():
        k2 = k.replace("vision_model.radio_model.model.patch_generator.embedder", "vision_model.embeddings.patch_projection")
        k2 = k2.replace("vision_model.radio_model.model.patch_generator.video_embedder", "vision_model.embeddings.video_patch_projection")
        k2 = k2.replace("vision_model.radio_model.model.patch_generator.pos_embed", "vision_model.embeddings.position_embedding")
        k2 = k2.replace("vision_model.radio_model.model.patch_generator.cls_token.token", "vision_model.embeddings.cls_register_token")
        k2 = k2.replace("vision_model.radio_model.model.blocks", "vision_model.encoder.layer")
        k2 = k2.replace("attn.proj", "attention.o_proj")
        k2 = re.sub(r"^mlp1\.0\.", "multi_modal_projector.layer_norm.", k2)
        k2 = re.sub(r"^mlp1\.1\.", "multi_modal_projector.linear_1.", k2)
        k2 = re.sub(r"^mlp1\.3\.", "multi_modal_projector.linear_2.", k2)
        k2 = k2.replace("language_model.backbone.", "language_model.model.")
        if "attn.qkv" in k2:
            for name, part in zip("qkv", np.split(v, 3, axis=0)):
                out[k2.replace("attn.qkv", f"attention.{name}_proj")] = part
            continue
        out[k2] = v
    return out


def test_transformers_module_names_load_identically(tmp_path):
    d, e = _case("omni_video")
    renamed = tmp_path / "renamed"
    shutil.copytree(d, renamed)
    path = renamed / "model.safetensors"
    tensors = _to_module_names(load_file(str(path)))
    assert any(k.startswith("vision_model.encoder.layer.0.attention.q_proj") for k in tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    model = hybridvlm.from_pretrained(str(renamed))
    logits = model(jnp.asarray(e["input_ids"]), pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_allclose(np.asarray(logits), e["logits"], atol=TOL, rtol=0)


def test_stored_head_is_used_although_text_config_says_tied(tmp_path):
    # The reference's language model is NemotronHForCausalLM, which never ties:
    # with tie_word_embeddings true (checked on transformers 5.24.0) it still
    # uses the stored language_model.lm_head.weight, so the logits stay those of the fixture.
    d, e = _case("omni_video")
    tied = tmp_path / "tied"
    shutil.copytree(d, tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    model = hybridvlm.from_pretrained(str(tied))
    assert not model.text_config.tie_word_embeddings
    logits = nnx.jit(lambda m, i, p: m(i, pixel_values_videos=p))(
        model, jnp.asarray(e["input_ids"]), jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_allclose(np.asarray(logits), e["logits"], atol=TOL, rtol=0)


def test_vlm_convert_round_trip(tmp_path):
    d, e = _case("omni_video")
    out = str(tmp_path / "converted")
    assert convert.main(["--hf", d, "--out", out]) == 0
    model = hybridvlm.from_pretrained(out)
    assert isinstance(model, NemotronHVLModel)
    logits = model(jnp.asarray(e["input_ids"]), pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    np.testing.assert_allclose(np.asarray(logits), e["logits"], atol=TOL, rtol=0)
    # Overrides reach the text config of a VLM, too.
    assert hybridvlm.from_pretrained(out, ssd_impl="sequential").text_config.ssd_impl == "sequential"


def test_placeholder_count_mismatch_gives_both_counts():
    d, e = _case("omni_video")
    model = hybridvlm.from_pretrained(d)
    ids = e["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == model.config.image_token_id)[0]] = 5  # one placeholder fewer
    pv = jnp.asarray(e["pixel_values_videos"])
    with pytest.raises(ValueError, match=r"11 visual placeholder tokens.*12 visual tokens"):
        model(jnp.asarray(ids), pixel_values_videos=pv)
    with pytest.raises(ValueError, match=r"11 visual placeholder"):
        model.generate(ids, max_new_tokens=2, pixel_values_videos=pv)


def test_vision_shape_mismatch_is_named(tmp_path):
    d, _ = _case("omni_video")
    bad = tmp_path / "bad"
    shutil.copytree(d, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["mlp1.1.weight"] = tensors["mlp1.1.weight"][:, :-1]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(hybridvlm.CheckpointError, match=r"mlp1\.1\.weight.*shape"):
        hybridvlm.from_pretrained(str(bad))


def test_image_path_uses_single_frame_projection():
    d, e = _case("omni_video")
    model = hybridvlm.from_pretrained(d)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 3, 32, 32)).astype(np.float32))
    emb = model.image_embeddings(images)
    assert emb.shape == (2 * 4, model.text_config.hidden_size)
    # Images take the single-frame projection: not the tubelet one.
    tubelet = jnp.concatenate([images, images], axis=1)[:, None]  # each image as a 2-frame tubelet
    assert np.abs(np.asarray(emb) - np.asarray(model.video_embeddings(tubelet))).max() > 1e-3
    ids = np.array([[1, 251] + [250] * 8 + [252, 90, 91]])
    logits = model(jnp.asarray(ids), pixel_values=images)
    assert logits.shape == (1, ids.shape[1], 256) and np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="not both"):
        model(jnp.asarray(ids), pixel_values=images, pixel_values_videos=jnp.asarray(e["pixel_values_videos"]))
    with pytest.raises(ValueError, match=r"8 visual placeholder.*pixel_values gives 4"):
        model(jnp.asarray(ids), pixel_values=images[:1])
