"""Language-aware scores (attention, Mamba-2 implicit attention) and EVS."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridvlm.ssd import ssd_sequential
from reduction.evs import evs_keep_count, evs_keep_indices, evs_retention_mask, evs_scores
from reduction.scores import ScoreConfig, attention_scores, implicit_attention_matrix, mamba_scores

GOLDEN = Path(__file__).parent / "fixtures" / "evs" / "evs_golden.npz"

CONFIGS = [
    ScoreConfig(),
    ScoreConfig(normalize_rows=False),
    ScoreConfig(reduce="max"),
    ScoreConfig(absolute=False, normalize_rows=False),
    ScoreConfig(absolute=False, reduce="max"),
    ScoreConfig(use_dt=False),
    ScoreConfig(mamba_mode="decay"),
    ScoreConfig(mamba_mode="decay", reduce="max", normalize_rows=False),
    ScoreConfig(mamba_mode="decay", absolute=False),
]


def _masks(rng, b, t, num_query):
    """Visual tokens interleaved with text (frame headers), a query at the end
    whose length differs per row, and left padding in row 1."""
    visual = rng.random((b, t)) < 0.6
    visual[:, t - num_query:] = False
    query = np.zeros((b, t), bool)
    query[:, t - num_query:] = True
    query[0, t - num_query] = False  # row 0 has a shorter question
    valid = np.ones((b, t), bool)
    if b > 1:
        valid[1, :2] = False  # left padding
    return visual, query, valid


# ----------------------------------------------------------------------------- numpy references


def _aggregate(rows, reduce):
    rows = np.array(rows)
    return rows.mean(0) if reduce == "mean" else rows.max(0)


def ref_attention_scores(q, k, num_query, visual, query, valid, scale, cfg):
    """Full softmax for every query row with loops: the plain formula."""
    q, k = np.float64(q), np.float64(k)
    b, t, n, _ = q.shape
    r = n // k.shape[2]
    out = np.zeros((b, t))
    for bi in range(b):
        keys = visual[bi] & valid[bi]
        rows = []
        for i in range(t - num_query, t):
            if not query[bi, i]:
                continue
            seen = valid[bi] & (np.arange(t) <= i)
            for h in range(n):
                logits = k[bi, :, h // r] @ q[bi, i, h] * scale
                p = np.where(seen, np.exp(logits - logits[seen].max()), 0.0)
                p /= p.sum()
                p = np.where(keys, p, 0.0)
                if cfg.normalize_rows and p.sum() > 0:
                    p /= p.sum()
                rows.append(p)
        if rows:
            out[bi] = np.where(keys, _aggregate(rows, cfg.reduce), 0.0)
    return out


def ref_mamba_scores(C, B, dt, A, num_query, visual, query, valid, cfg):
    """M[q, j] entry by entry, the decay as a product of per-step factors."""
    C, B, dt, A = (np.float64(v) for v in (C, B, dt, A))
    b, t, g, _ = C.shape
    h = dt.shape[2]
    r = h // g
    out = np.zeros((b, t))
    for bi in range(b):
        keys = visual[bi] & valid[bi]
        rows = []
        for i in range(t - num_query, t):
            if not query[bi, i]:
                continue
            for head in range(g if cfg.mamba_mode == "decay_free" else h):
                s = np.zeros(t)
                for j in range(i + 1):
                    if cfg.mamba_mode == "decay_free":
                        s[j] = C[bi, i, head] @ B[bi, j, head]
                        if cfg.use_dt:
                            s[j] *= dt[bi, j, head * r:(head + 1) * r].mean()
                    else:
                        grp = head // r
                        decay = np.prod([np.exp(dt[bi, m, head] * A[head]) for m in range(j + 1, i + 1)])
                        s[j] = (C[bi, i, grp] @ B[bi, j, grp]) * decay * dt[bi, j, head]
                if cfg.absolute:
                    s = np.abs(s)
                s = np.where(keys, s, 0.0)
                if cfg.normalize_rows and np.abs(s).sum() > 0:
                    s /= np.abs(s).sum()
                rows.append(s)
        if rows:
            out[bi] = np.where(keys, _aggregate(rows, cfg.reduce), 0.0)
    return out


def ref_evs_mask(x, rate):
    """EVS from its formula: 1 - cos to the previous tubelet, first tubelet first,
    stable descending order, k = max(P, int(T * P * (1 - q)))."""
    x = np.float64(x)
    t, p, _ = x.shape
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
    score = np.concatenate([np.full((1, p), np.inf), 1 - (unit[1:] * unit[:-1]).sum(-1)]).reshape(-1)
    k = max(p, int(t * p * (1 - rate)))
    mask = np.zeros(t * p, bool)
    mask[np.argsort(-score, kind="stable")[:k]] = True
    return mask


# ----------------------------------------------------------------------------- inputs


def _attention_inputs(seed=0, b=2, t=13, n=4, kv=2, d=8, num_query=4):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, d)).astype(np.float32)
    k = rng.standard_normal((b, t, kv, d)).astype(np.float32)
    return q, k, *_masks(rng, b, t, num_query)


def _mamba_inputs(seed=0, b=2, t=11, g=2, h=4, n=6, num_query=3):
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((b, t, g, n)).astype(np.float32)
    B = rng.standard_normal((b, t, g, n)).astype(np.float32)
    dt = np.log1p(np.exp(rng.standard_normal((b, t, h)))).astype(np.float32)  # softplus
    A = -np.exp(rng.standard_normal(h) * 0.5).astype(np.float32)
    return C, B, dt, A, *_masks(rng, b, t, num_query)


def _attn(q, k, visual, query, valid, cfg, num_query=4, block_k=5):
    return np.asarray(attention_scores(jnp.asarray(q), jnp.asarray(k), num_query=num_query,
                                       visual_mask=visual, query_mask=query, key_valid=valid,
                                       scale=0.35, cfg=cfg, block_k=block_k))


def _mamba(C, B, dt, A, visual, query, valid, cfg, num_query=3, block_k=4):
    return np.asarray(mamba_scores(C, B, dt, A, num_query=num_query, visual_mask=visual, query_mask=query,
                                   key_valid=valid, cfg=cfg, block_k=block_k))


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: f"norm{c.normalize_rows}-{c.reduce}")
@pytest.mark.parametrize("block_k", [5, 64])  # several padded key blocks / one block
def test_attention_scores_match_full_softmax(cfg, block_k):
    q, k, visual, query, valid = _attention_inputs()
    got = _attn(q, k, visual, query, valid, cfg, block_k=block_k)
    want = ref_attention_scores(q, k, 4, visual, query, valid, 0.35, cfg)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.all(got[~(visual & valid)] == 0) and np.all(got[visual & valid] > 0)


def test_attention_normalize_rows_semantics():
    """Without normalisation the visual part of one row's softmax sums to its
    visual attention mass (< 1: text keys take some); with it, to 1."""
    q, k, visual, query, valid = _attention_inputs(b=1)
    query[:] = False
    query[0, -1] = True  # one query row: the aggregate is that row, averaged over heads
    raw = _attn(q, k, visual, query, valid, ScoreConfig(normalize_rows=False))
    norm = _attn(q, k, visual, query, valid, ScoreConfig())
    assert 0 < raw.sum() < 1
    assert norm.sum() == pytest.approx(1.0, rel=1e-5)


def test_attention_gqa_uses_the_kv_head_of_each_query_group():
    q, k, visual, query, valid = _attention_inputs(b=1)
    # Repeating the kv heads for every query head is the same attention.
    k_full = np.repeat(k, 2, axis=2)
    a = _attn(q, k, visual, query, valid, ScoreConfig())
    b = _attn(q, k_full, visual, query, valid, ScoreConfig())
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_attention_batch_rows_are_independent_and_padding_is_ignored():
    q, k, visual, query, valid = _attention_inputs()
    both = _attn(q, k, visual, query, valid, ScoreConfig())
    row1 = _attn(q[1:], k[1:], visual[1:], query[1:], valid[1:], ScoreConfig())
    np.testing.assert_allclose(both[1], row1[0], rtol=1e-6)
    # Garbage in the padded keys (even flagged visual) changes nothing.
    k2, vis2 = k.copy(), visual.copy()
    k2[1, :2] = 100.0
    vis2[1, :2] = True
    again = _attn(q, k2, vis2, query, valid, ScoreConfig())
    np.testing.assert_allclose(again, both, rtol=1e-6)
    assert np.all(again[1, :2] == 0)


def test_keys_after_a_query_row_get_nothing_from_it():
    """Causality: a query row at position i sees keys j <= i only."""
    q, k, visual, _, valid = _attention_inputs(b=1, t=6, num_query=6)
    C, B, dt, A, *_ = _mamba_inputs(b=1, t=6)
    visual[:] = True
    query = np.zeros((1, 6), bool)
    query[0, 2] = True
    attn = _attn(q, k, visual, query, valid, ScoreConfig(), num_query=6)
    assert np.all(attn[0, 3:] == 0) and np.all(attn[0, :3] > 0)
    for cfg in (ScoreConfig(), ScoreConfig(mamba_mode="decay")):
        mamba = _mamba(C, B, dt, A, visual, query, valid, cfg, num_query=6)
        assert np.all(mamba[0, 3:] == 0) and np.all(mamba[0, :3] > 0)


def test_masked_query_rows_do_not_count():
    q, k, visual, query, valid = _attention_inputs()
    short = query.copy()
    short[:, -4:-2] = False  # keep only the last 2 query rows
    a = _attn(q, k, visual, short, valid, ScoreConfig(), num_query=4)
    b = _attn(q, k, visual, None, valid, ScoreConfig(), num_query=2)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_attention_scores_under_jit():
    q, k, visual, query, valid = _attention_inputs()
    f = jax.jit(attention_scores, static_argnames=("num_query", "scale", "cfg", "block_k"))
    got = f(q, k, num_query=4, visual_mask=visual, query_mask=query, key_valid=valid, scale=0.35,
            cfg=ScoreConfig(), block_k=5)
    np.testing.assert_allclose(got, _attn(q, k, visual, query, valid, ScoreConfig()), rtol=1e-6)


# ----------------------------------------------------------------------------- Mamba-2


def test_implicit_attention_matrix_reproduces_the_ssd():
    """Paper math: with the decay, the implicit attention matrix applied to the
    mixer's SSD input x gives the SSD output (no D skip)."""
    rng = np.random.default_rng(3)
    b, t, g, h, n, p = 2, 12, 2, 4, 5, 3
    C, B, dt, A, *_ = _mamba_inputs(seed=3, b=b, t=t, g=g, h=h, n=n)
    x = rng.standard_normal((b, t, h, p)).astype(np.float32)
    y, _ = ssd_sequential(jnp.asarray(x), jnp.asarray(dt), jnp.asarray(A), jnp.asarray(B), jnp.asarray(C))
    M = implicit_attention_matrix(C, B, dt, A)
    assert M.shape == (b, h, t, t)
    np.testing.assert_allclose(jnp.einsum("bhij,bjhp->bihp", M, x), y, rtol=1e-4, atol=1e-5)
    assert np.all(np.triu(np.asarray(M), k=1) == 0)  # causal


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{v}" for v in dataclasses.astuple(c)))
def test_mamba_scores_match_a_loop(cfg):
    C, B, dt, A, visual, query, valid = _mamba_inputs()
    got = _mamba(C, B, dt, A, visual, query, valid, cfg)
    want = ref_mamba_scores(C, B, dt, A, 3, visual, query, valid, cfg)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.all(got[~(visual & valid)] == 0)


def test_mamba_decay_mode_is_the_implicit_attention_rows():
    C, B, dt, A, visual, query, valid = _mamba_inputs(b=1)
    query[:] = False
    query[0, -1] = True
    cfg = ScoreConfig(mamba_mode="decay", absolute=False, normalize_rows=False)
    got = _mamba(C, B, dt, A, visual, query, valid, cfg)
    M = np.asarray(implicit_attention_matrix(C, B, dt, A))[0, :, -1]  # (h, t): the last row
    np.testing.assert_allclose(got[0], np.where(visual[0], M.mean(0), 0), rtol=1e-5, atol=1e-7)


def test_aggregation_options_change_the_result():
    C, B, dt, A, visual, query, valid = _mamba_inputs()
    base = _mamba(C, B, dt, A, visual, query, valid, ScoreConfig())
    for change in (dict(mamba_mode="decay"), dict(use_dt=False), dict(absolute=False),
                   dict(normalize_rows=False), dict(reduce="max")):
        other = _mamba(C, B, dt, A, visual, query, valid, ScoreConfig(**change))
        assert not np.allclose(other, base), change
    # absolute=False keeps signs: some raw C.B products are negative.
    raw = _mamba(C, B, dt, A, visual, query, valid, ScoreConfig(absolute=False))
    assert (raw < 0).any() and (base >= 0).all()
    # max >= mean, entry by entry, for non-negative scores.
    assert np.all(_mamba(C, B, dt, A, visual, query, valid, ScoreConfig(reduce="max")) >= base - 1e-7)


def test_mamba_batch_rows_are_independent_and_padding_is_ignored():
    C, B, dt, A, visual, query, valid = _mamba_inputs()
    cfg = ScoreConfig()
    both = _mamba(C, B, dt, A, visual, query, valid, cfg)
    row1 = _mamba(C[1:], B[1:], dt[1:], A, visual[1:], query[1:], valid[1:], cfg)
    np.testing.assert_allclose(both[1], row1[0], rtol=1e-6)
    B2, vis2 = B.copy(), visual.copy()
    B2[1, :2] = 50.0
    vis2[1, :2] = True
    again = _mamba(C, B2, dt, A, vis2, query, valid, cfg)
    np.testing.assert_allclose(again, both, rtol=1e-6)


def test_mamba_scores_blocking_does_not_matter():
    C, B, dt, A, visual, query, valid = _mamba_inputs()
    for cfg in (ScoreConfig(), ScoreConfig(mamba_mode="decay", reduce="max")):
        a = _mamba(C, B, dt, A, visual, query, valid, cfg, block_k=3)
        b = _mamba(C, B, dt, A, visual, query, valid, cfg, block_k=1000)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_score_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mamba_mode"):
        ScoreConfig(mamba_mode="exact")
    with pytest.raises(ValueError, match="reduce"):
        ScoreConfig(reduce="sum")
    with pytest.raises(ValueError, match="max_query"):
        ScoreConfig(max_query=0)
    with pytest.raises(ValueError, match="num_query"):
        _mamba(*_mamba_inputs(), ScoreConfig(), num_query=0)


# ----------------------------------------------------------------------------- EVS


def test_evs_keep_count_follows_the_reference_rule():
    assert evs_keep_count(5, 6, 0.5) == 15
    assert evs_keep_count(10, 9, 0.3) == 62  # int(62.99999999999999): truncation, not rounding
    assert evs_keep_count(3, 4, 0.99) == 4  # never fewer than one tubelet
    assert evs_keep_count(3, 4, 0.0) == 12
    with pytest.raises(ValueError, match="rate"):
        evs_keep_count(3, 4, 1.5)


def test_evs_matches_the_hf_reference_golden():
    data = np.load(GOLDEN)
    for i in range(int(data["num_cases"])):
        x, rate, want = data[f"case{i}_embeds"], float(data[f"case{i}_rate"]), data[f"case{i}_mask"]
        got = np.asarray(evs_retention_mask(jnp.asarray(x), rate))
        np.testing.assert_array_equal(got, want, err_msg=f"case {i}")
        assert got.sum() == int(data[f"case{i}_keep"]) == evs_keep_count(*x.shape[:2], rate)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.75, 0.95])
def test_evs_matches_the_formula(rate):
    x = np.random.default_rng(1).standard_normal((7, 5, 6)).astype(np.float32)
    got = np.asarray(evs_retention_mask(jnp.asarray(x), rate))
    np.testing.assert_array_equal(got, ref_evs_mask(x, rate))
    assert got[:5].all()  # the first tubelet
    assert got.sum() == evs_keep_count(7, 5, rate)
    idx = np.asarray(evs_keep_indices(jnp.asarray(x), rate))
    np.testing.assert_array_equal(idx, np.flatnonzero(got))  # original order


def test_evs_prunes_static_tubelets_first():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 4, 8)).astype(np.float32)
    x[2] = x[1]  # a static stretch: tubelets 2 and 3 repeat tubelet 1 exactly
    x[3] = x[1]
    x[5, :2] = 3.0 * x[4, :2]  # same direction: cosine 1, also static for EVS
    static = np.zeros((6, 4), bool)
    static[2:4] = True
    static[5, :2] = True
    rate = static.sum() / 24 - 1e-9  # keep exactly the changing tokens
    assert evs_keep_count(6, 4, rate) == 24 - static.sum()
    got = np.asarray(evs_retention_mask(jnp.asarray(x), rate)).reshape(6, 4)
    np.testing.assert_array_equal(got, ~static)
    scores = np.asarray(evs_scores(jnp.asarray(x))).reshape(6, 4)
    assert np.isinf(scores[0]).all() and np.allclose(scores[static], 0, atol=1e-6)


def test_evs_under_jit_and_vmap():
    x = np.random.default_rng(4).standard_normal((3, 5, 6, 4)).astype(np.float32)  # 3 videos
    f = jax.jit(jax.vmap(lambda v: evs_retention_mask(v, 0.5)))
    got = np.asarray(f(jnp.asarray(x)))
    for v in range(3):
        np.testing.assert_array_equal(got[v], ref_evs_mask(x[v], 0.5))
