"""Layerwise sparsity / importance stability analysis (reduction.analysis, eval.analyze)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridvlm.cache import Layout
from hybridvlm.lm import NemotronHForCausalLM
from reduction import analysis
from reduction.analysis import mass_fraction, spearman, stability_matrices, summarize, topk_overlap
from reduction.scores import ScoreConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- statistics


def test_mass_fraction_uniform_and_one_hot():
    for v in (4, 10, 128):
        assert mass_fraction(np.ones(v)) == pytest.approx(np.ceil(0.9 * v) / v)
    assert mass_fraction(np.ones(10)) == pytest.approx(0.9)  # 0.1 summed 9 times is 0.8999...
    onehot = np.zeros((3, 7))
    onehot[np.arange(3), [0, 3, 6]] = 5.0
    np.testing.assert_allclose(mass_fraction(onehot), 1 / 7)
    # Batched over leading axes; the order of the tokens does not matter.
    s = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.3, 0.5]])
    np.testing.assert_allclose(mass_fraction(s, mass=0.8), [0.5, 0.5])
    np.testing.assert_allclose(mass_fraction(s, mass=0.81), [0.75, 0.75])
    assert np.isnan(mass_fraction(np.zeros(5)))
    with pytest.raises(ValueError):
        mass_fraction(np.ones(3), mass=0.0)


def test_spearman_hand_computed_ties_monotone_and_reversed():
    a = np.array([1.0, 2, 3, 4, 5])
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (-1, 1, -1, 1, 0).
    assert spearman(a, [2.0, 1, 4, 3, 5]) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # Ties: b = (5, 6, 7, 8, 7) has ranks (1, 2, 3.5, 5, 3.5); Pearson of the ranks = 8 / sqrt(10 * 9.5).
    np.testing.assert_allclose(analysis.rankdata([5.0, 6, 7, 8, 7]), [1, 2, 3.5, 5, 3.5])
    assert spearman(a, [5.0, 6, 7, 8, 7]) == pytest.approx(8 / np.sqrt(95))
    x = np.random.default_rng(0).normal(size=(3, 50))
    np.testing.assert_allclose(spearman(x, np.exp(3 * x) + 7), 1.0)
    np.testing.assert_allclose(spearman(x, -x ** 3), -1.0)
    np.testing.assert_allclose(spearman(x, x[:, ::-1]), spearman(x[:, ::-1], x))
    assert np.isnan(spearman(a, np.ones(5)))


def test_topk_overlap_exact():
    a = np.arange(8.0)  # top 25% = {6, 7}
    assert topk_overlap(a, a) == 1.0
    assert topk_overlap(a, -a) == 0.0
    assert topk_overlap(a, [0, 0, 0, 0, 0, 0, 9, 0], frac=0.25) == 0.5  # top of b: {6, 0} (tie -> lower index)
    assert topk_overlap(a, np.array([7.0, 6, 5, 4, 3, 2, 1, 0]), frac=0.5) == 0.0
    assert topk_overlap(a, [0, 1, 2, 3, 9, 8, 7, 6], frac=0.5) == 1.0
    assert topk_overlap(np.arange(3.0), np.arange(3.0)[::-1], frac=0.01) == 0.0  # k >= 1


def test_stability_matrices_and_summary():
    rng = np.random.default_rng(1)
    base = rng.random((2, 40))
    scores = np.stack([base, base ** 2, -base, rng.random((2, 40))])  # (L=4, b=2, V=40)
    sp, ov = stability_matrices(scores)
    assert sp.shape == ov.shape == (4, 4)
    np.testing.assert_allclose(np.diag(sp), 1.0)
    np.testing.assert_allclose(np.diag(ov), 1.0)
    np.testing.assert_allclose(sp, sp.T)
    assert sp[0, 1] == pytest.approx(1.0) and sp[0, 2] == pytest.approx(-1.0)
    assert ov[0, 1] == 1.0 and ov[0, 2] == 0.0
    np.testing.assert_allclose(sp[0, 3], spearman(base, scores[3]).mean())
    np.testing.assert_allclose(ov[0, 3], topk_overlap(base, scores[3]).mean())
    # Groups of examples with different V are averaged example by example.
    sp2, _ = stability_matrices([scores, scores[:, :1, :10]])
    np.testing.assert_allclose(sp2[0, 3], np.mean([*spearman(base, scores[3]), spearman(base[0, :10], scores[3, 0, :10])]))

    s = summarize(np.abs(scores), "M-*M")
    assert s["num_layers"] == 4 and s["num_examples"] == 2 and s["kinds"] == "M-*M"
    assert len(s["sparsity"]["mean"]) == 4 and np.array(s["spearman"]).shape == (4, 4)
    assert s["layers"][3]["spearman_next"] is None and s["layers"][0]["overlap_last"] == pytest.approx(ov[0, 3])
    assert s["by_kind"]["mamba"]["layers"] == [0, 3] and s["by_kind"]["attention"]["num_layers"] == 1
    json.dumps(s, allow_nan=False)


# ----------------------------------------------------------------------------- recording


def _lm_inputs(tiny_config, b=2, t=24, num_visual=10):
    lm = NemotronHForCausalLM(tiny_config(), rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 60, (b, t)), jnp.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0  # left padding in row 1
    visual = np.zeros((b, t), bool)
    for r in range(b):  # a different set of visual positions per row, all before the question
        visual[r, rng.choice(np.arange(4, t - 6), num_visual, replace=False)] = True
    return lm, lm.embed_tokens(ids), Layout.prompt(jnp.asarray(mask)), jnp.asarray(visual)


def _manual_scores(lm, h, layout, visual, cfg):
    """Independent reference: layer i's scores on the hidden states after running layers < i by hand."""
    out = []
    for i in range(lm.num_layers):
        out.append(lm.visual_scores(i, h, layout, visual, cfg))  # (b, t)
        h, _ = lm.layers[i](h, layout)
    return jnp.stack(out)


def test_layerwise_scores_match_manual_loop(tiny_config):
    lm, h, layout, visual = _lm_inputs(tiny_config)
    cfg = ScoreConfig(max_query=6)
    graphdef, state = nnx.split(lm)
    f = jax.jit(lambda s, h, layout, v: nnx.merge(graphdef, s).layerwise_visual_scores(h, layout, v, cfg,
                                                                                        num_visual=10))
    scores = np.asarray(f(state, h, layout, visual))
    assert scores.shape == (lm.num_layers, 2, 10) and scores.dtype == np.float32
    ref = jax.jit(lambda s, h, layout, v: _manual_scores(nnx.merge(graphdef, s), h, layout, v, cfg))
    full = np.asarray(ref(state, h, layout, visual))  # (L, b, t)
    vis = np.asarray(visual)
    for i in range(lm.num_layers):
        for r in range(2):
            np.testing.assert_allclose(scores[i, r], full[i, r][vis[r]], rtol=1e-5, atol=1e-7)
    assert np.all(scores >= 0) and np.all(scores.sum(-1) > 0)
    # Layers differ (the hidden states change with depth).
    assert not np.allclose(scores[0], scores[-1])

    with pytest.raises(ValueError, match="at least one visual token"):
        lm.layerwise_visual_scores(h, layout, visual, cfg, num_visual=0)


# ----------------------------------------------------------------------------- CLI


def test_cli_default_tiny_setup(tmp_path):
    out = tmp_path / "out"
    json_path = tmp_path / "custom" / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "eval.analyze", "--out", str(out), "--json", str(json_path), "--num_examples", "2",
         "--config.max_frames=8", "--save_scores"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UNTRAINED" in proc.stdout and "sparsity@90%" in proc.stdout
    r = json.loads(json_path.read_text())
    for key in ("model", "untrained", "question", "score_config", "pattern", "examples", "num_layers", "num_examples",
                "mass", "topk_frac", "sparsity", "spearman", "overlap", "layers", "by_kind", "files"):
        assert key in r, key
    L = len(r["pattern"])
    assert r["untrained"] and r["num_layers"] == L and r["num_examples"] == 2
    assert [e["name"] for e in r["examples"]] == ["clip0", "clip1"]
    assert all(e["visual_tokens"] == 4 * 16 for e in r["examples"])  # 8 frames -> 4 tubelets x 16 tokens
    assert np.array(r["spearman"]).shape == (L, L) == np.array(r["overlap"]).shape
    np.testing.assert_allclose(np.diag(np.array(r["spearman"], float)), 1.0, atol=1e-9)
    assert all(0 < v <= 1 for v in r["sparsity"]["mean"])
    assert [row["kind"] for row in r["layers"]] == list(r["pattern"])
    assert set(r["by_kind"]) == {"mamba", "attention", "mlp"}
    assert not (out / "analysis.json").exists()
    pngs = ["sparsity.png", "spearman.png", "overlap.png", "scores_clip0.png", "scores_clip1.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, name
    raw = np.load(out / "scores.npz")
    assert raw["clip0"].shape == (L, 64)
    assert not [p for p in os.listdir(out) if p.startswith(".tmp_")]


def test_analyze_on_synth_questions_uses_each_examples_own_question(tmp_path):
    from configs import tiny_vlm
    from eval import analyze
    from hybridvlm.data import synth
    from hybridvlm.tokenizer import synth_tokenizer
    from hybridvlm.vlm import NemotronHVLModel
    from test_videoqa import tiny_config
    from train.model import save_model, vlm_config

    ckpt = str(tmp_path / "svqa")
    save_model(NemotronHVLModel(vlm_config(tiny_config().model), rngs=nnx.Rngs(0)), synth_tokenizer(), ckpt)
    cfg = tiny_vlm.get_config()
    cfg.max_frames = 16
    result = analyze.run(cfg, checkpoint=ckpt, data="synth:test", num_examples=3, out_dir=str(tmp_path / "out"),
                         verbose=False)
    want = [synth.generate(synth.split_seed(0, "test"), i, num_frames=16, size=32) for i in range(3)]
    got = result["examples"]
    assert [e["uid"] for e in got] == [r.uid for r in want]
    assert [e["question"] for e in got] == [r.question for r in want]
    assert [e["answer"] for e in got] == [r.answer_letter for r in want]
    assert all(e["visual_tokens"] == 8 * 4 for e in got)  # 8 tubelets x 4 tokens
    assert len(result["layers"]) == 9 and os.path.exists(result["files"]["sparsity"])
    with pytest.raises(Exception, match="--data, --video"):
        analyze.run(cfg, checkpoint=ckpt, data="synth:test", videos=["a.mp4"], out_dir=str(tmp_path / "o2"))
