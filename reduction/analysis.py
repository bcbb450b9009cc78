"""Analysis of visual-token importance across depth (the paper's two measured properties).

  layerwise sparsity   within a layer, few visual tokens carry the query-relevant
                       signal: `mass_fraction` = the smallest fraction of the visual
                       tokens whose scores hold 90% of the layer's score mass;
  importance stability whether the important tokens stay the same across depth:
                       Spearman rank correlation (`spearman`) and top-25% overlap
                       (`topk_overlap`) between the scores of every pair of layers.

The model records the scores (`NemotronHForCausalLM.layerwise_visual_scores`:
the visual tokens entering every layer of an unpruned forward, jit-friendly);
this module is numpy post-processing of its (num_layers, b, V) output and
never imports the model.

Conventions:
  * statistics run over the last axis (visual tokens); leading axes broadcast;
  * `mass_fraction` uses |scores| (scores are >= 0 with the default
    ScoreConfig; with absolute=False a Mamba score's magnitude is its weight);
    an all-zero row gives NaN;
  * `spearman` uses average ranks for ties; a constant row gives NaN;
  * `topk_overlap` keeps k = max(1, round(frac * V)) tokens, ties broken by
    the lower token index (stable sort), so the result is deterministic;
  * averages over examples ignore NaN (`np.nanmean`).
"""

from __future__ import annotations

from collections.abc import Sequence

import warnings

import numpy as np

KIND_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


# ----------------------------------------------------------------------------- statistics


def mass_fraction(scores, mass: float = 0.9):
    """Smallest fraction of tokens (last axis) whose largest scores hold `mass`
    of the total: (..., V) -> (...) float64 in [1/V, 1]; NaN for an all-zero row.

    Uniform scores give ceil(mass * V) / V; a one-hot row gives 1 / V.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass={mass} must be in (0, 1]")
    s = np.abs(np.asarray(scores, np.float64))
    v = s.shape[-1]
    srt = -np.sort(-s, axis=-1)
    csum = np.cumsum(srt, axis=-1)
    total = csum[..., -1:]
    # Relative tolerance: 10 x 0.1 summed in floating point is 0.8999...
    reached = csum >= mass * total * (1.0 - 1e-9)
    k = np.argmax(reached, axis=-1) + 1
    frac = k / v
    return np.where(total[..., 0] > 0, frac, np.nan)


def rankdata(x):
    """Average ranks (1..V) along the last axis; ties share their mean rank."""
    x = np.asarray(x, np.float64)
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        order = np.argsort(row, kind="stable")
        srt = row[order]
        # Start of each tie group in sorted order; average rank = mean of positions + 1.
        new = np.concatenate([[True], srt[1:] != srt[:-1]])
        group = np.cumsum(new) - 1
        starts = np.flatnonzero(new)
        ends = np.concatenate([starts[1:], [len(row)]])
        avg = (starts + ends - 1) / 2.0 + 1.0
        ranks = np.empty(len(row))
        ranks[order] = avg[group]
        out[r] = ranks
    return out.reshape(x.shape)


def _pearson(a, b):
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(a, b):
    """Spearman rank correlation along the last axis (average ranks for ties).

    (..., V), (..., V) -> (...); NaN where either row is constant.
    """
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return _pearson(rankdata(a), rankdata(b))


def _topk(n: int, frac: float) -> int:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac={frac} must be in (0, 1]")
    return max(1, int(round(frac * n)))


def topk_mask(scores, frac: float = 0.25):
    """(..., V) -> (..., V) bool: the k = max(1, round(frac V)) highest scores
    (ties to the lower index)."""
    s = np.asarray(scores, np.float64)
    k = _topk(s.shape[-1], frac)
    idx = np.argsort(-s, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(s.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def topk_overlap(a, b, frac: float = 0.25):
    """|top_k(a) ∩ top_k(b)| / k along the last axis, k = max(1, round(frac V))."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    k = _topk(a.shape[-1], frac)
    return (topk_mask(a, frac) & topk_mask(b, frac)).sum(-1) / k


def _as_groups(scores) -> list[np.ndarray]:
    """An array (L, b, V) or a sequence of such arrays (examples with different
    V) -> list of (L, b_i, V_i) float64 arrays."""
    if isinstance(scores, (list, tuple)):
        groups = [np.asarray(s, np.float64) for s in scores]
    else:
        groups = [np.asarray(scores, np.float64)]
    for g in groups:
        if g.ndim != 3:
            raise ValueError(f"scores must be (num_layers, examples, V), got shape {g.shape}")
    if len({g.shape[0] for g in groups}) != 1:
        raise ValueError("all score groups need the same number of layers")
    return groups


def per_example_stability(scores, frac: float = 0.25):
    """(L, b, V) (or a list of such) -> spearman (n, L, L), overlap (n, L, L) per example."""
    sp, ov = [], []
    for g in _as_groups(scores):
        L, _, V = g.shape
        r = rankdata(g)  # (L, b, V)
        r = r - r.mean(-1, keepdims=True)
        norm = np.sqrt((r * r).sum(-1))  # (L, b)
        cov = np.einsum("ibv,jbv->bij", r, r)
        den = norm.T[:, :, None] * norm.T[:, None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            sp.append(np.where(den > 0, cov / np.where(den > 0, den, 1.0), np.nan))
        m = topk_mask(g, frac).astype(np.float64)
        ov.append(np.einsum("ibv,jbv->bij", m, m) / _topk(V, frac))
    return np.concatenate(sp), np.concatenate(ov)


def stability_matrices(scores, frac: float = 0.25):
    """(L, b, V) scores (or a list of such) -> (spearman (L, L), overlap (L, L)),
    each the mean over examples of the per-example layer-by-layer matrix."""
    sp, ov = per_example_stability(scores, frac)
    with np.errstate(invalid="ignore"), _quiet():
        return np.nanmean(sp, axis=0), np.nanmean(ov, axis=0)


class _quiet:
    """Silences numpy's 'mean of empty slice' warning (all-NaN columns stay NaN)."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _nan_stat(fn, x, axis=None):
    with _quiet():
        return fn(x, axis=axis)


def _clean(x):
    """numpy -> JSON-ready python (NaN -> None)."""
    arr = np.asarray(x, np.float64)
    if arr.ndim == 0:
        v = float(arr)
        return None if np.isnan(v) else v
    return [_clean(a) for a in arr]


def summarize(scores, kinds: str | Sequence[str] | None = None, *, mass: float = 0.9, frac: float = 0.25) -> dict:
    """Everything the analysis reports, JSON-ready (NaN -> None).

    Args:
      scores: (L, b, V) from `NemotronHForCausalLM.layerwise_visual_scores` (or a list of such arrays for
        groups of examples with different V).
      kinds: per-layer kind chars ("M", "*", "-"), e.g. the LM's pattern.
      mass: score mass for the sparsity; frac: top fraction for the overlap.
    Returns:
      dict with
        num_layers, num_examples, mass, topk_frac, kinds;
        sparsity: {"mean": [L], "std": [L], "per_example": [[n] x L]};
        spearman, overlap: (L, L) nested lists (mean over examples);
        layers: [{layer, kind, sparsity_mean, sparsity_std, spearman_next,
                  overlap_next, spearman_last, overlap_last}];
        by_kind: {kind name: {layers, num_layers, sparsity_mean,
                  spearman_next_mean, overlap_next_mean, overlap_last_mean}}.
    """
    groups = _as_groups(scores)
    L = groups[0].shape[0]
    kinds = list(kinds) if kinds is not None else ["?"] * L
    if len(kinds) != L:
        raise ValueError(f"{len(kinds)} layer kinds for {L} layers")
    sparsity = np.concatenate([mass_fraction(g, mass) for g in groups], axis=1)  # (L, n)
    sp, ov = stability_matrices(groups, frac)
    sp_mean = _nan_stat(np.nanmean, sparsity, axis=1)
    sp_std = _nan_stat(np.nanstd, sparsity, axis=1)

    layers = []
    for i in range(L):
        nxt = i + 1 if i + 1 < L else None
        layers.append(dict(
            layer=i, kind=kinds[i], sparsity_mean=_clean(sp_mean[i]), sparsity_std=_clean(sp_std[i]),
            spearman_next=None if nxt is None else _clean(sp[i, nxt]),
            overlap_next=None if nxt is None else _clean(ov[i, nxt]),
            spearman_last=_clean(sp[i, L - 1]), overlap_last=_clean(ov[i, L - 1]),
        ))

    by_kind = {}
    for kind in dict.fromkeys(kinds):
        idx = [i for i in range(L) if kinds[i] == kind]
        nxt = [i for i in idx if i + 1 < L]
        by_kind[KIND_NAMES.get(kind, kind)] = dict(
            kind=kind, layers=idx, num_layers=len(idx),
            sparsity_mean=_clean(_nan_stat(np.nanmean, sp_mean[idx])),
            spearman_next_mean=_clean(_nan_stat(np.nanmean, np.array([sp[i, i + 1] for i in nxt]))) if nxt else None,
            overlap_next_mean=_clean(_nan_stat(np.nanmean, np.array([ov[i, i + 1] for i in nxt]))) if nxt else None,
            overlap_last_mean=_clean(_nan_stat(np.nanmean, ov[idx, L - 1])),
        )
    return dict(
        num_layers=L, num_examples=int(sparsity.shape[1]), mass=mass, topk_frac=frac, kinds="".join(kinds),
        sparsity=dict(mean=_clean(sp_mean), std=_clean(sp_std), per_example=_clean(sparsity)),
        spearman=_clean(sp), overlap=_clean(ov), layers=layers, by_kind=by_kind,
    )
