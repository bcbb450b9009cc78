"""Language-aware importance scores of visual tokens, from the text query rows.

Both block types of the hybrid LM get a score per key position j from the
query rows q (the text that follows the video):

  attention:  mean/max over heads and q of softmax_k(q . k / sqrt(d))[j];
  Mamba-2:    the implicit attention of the SSD, B playing the key and C the
              query (`ScoreConfig.mamba_mode`):
                "decay_free"  s[q, j] = C_q . B_j  (x dt_j),
                "decay"       M[q, j] = (C_q . B_j) exp(A sum_{k=j+1..q} dt_k) dt_j.

Query rows. The prompt puts the question after the video, so the query is
the last tokens of each row. The number of question tokens varies per
example, so callers pass a static upper bound `num_query` (the last
`num_query` positions of every row are candidate query rows) and, if some of
those positions are not query tokens (shorter questions, right padding),
`query_mask` marks the real ones. Only those rows are ever computed: the
cost is O(num_query * t) per head, never O(t^2).

Keys are processed in blocks of `block_k` positions (`lax.scan`) in two
passes: pass 1 collects per-row statistics (softmax max/sums, or the L1 norm
used by `normalize_rows`), pass 2 forms the normalised block scores and
folds them over heads and rows right away, so memory is
O(heads * num_query * block_k).

Causality uses index order: query row i sees key j iff j <= i (and key_valid).
Scores are float32 and 0 at positions that are not visual (or not valid).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from einops import rearrange

MAMBA_MODES = ("decay_free", "decay")
REDUCES = ("mean", "max")

# Finite "minus infinity" for masked logits (keeps fully masked rows NaN-free).
_NEG = -1e30
# Guard for dividing by a row sum that is zero (rows with no visible visual key).
_TINY = 1e-30


@dataclass(frozen=True)
class ScoreConfig:
    """How scores are formed and aggregated (static; hashable for jit).

    Attributes:
      mamba_mode: "decay_free" (default) or "decay" (see module docstring).
        Default decay-free: the paper reports that dropping the position
        dependent decay gives the stronger signal (with decay, a query row
        barely sees visual tokens far behind it, which biases selection
        towards the end of the video).
      use_dt: multiply Mamba scores by the input step dt_j (decay-free mode:
        dt_j averaged over the heads of the B/C group). Default True: dt_j is
        how strongly token j is written into the state, a factor of the exact
        M[q, j]. The decay mode always includes dt_j (it is part of M).
      absolute: take |score| before normalising and aggregating. Default True:
        C_q . B_j has arbitrary sign, and a large negative contribution to the
        state read-out is as important as a positive one. No-op for attention
        (probabilities are >= 0).
      normalize_rows: divide each query row's scores over the visual keys by
        their L1 sum (per head), so every query row and head has equal weight
        in the aggregate. Default True: Mamba rows have arbitrary scale (|C_q|
        varies per token). For attention the softmax is over ALL keys (text,
        sinks, visual); the option renormalises its visual part, i.e. uses the
        attention distribution conditioned on looking at visual tokens, so a
        head that mostly attends to text counts as much as one reading the
        video. The paper's attention formula (plain softmax, restricted to
        visual keys) is normalize_rows=False.
      reduce: "mean" (default, the paper's formula) or "max" over heads (or
        groups) and query rows.
      max_query: static upper bound on the query rows a model caller reads
        (it passes num_query = min(max_query, t) to the functions below).
        Default 128: a question with multiple-choice options and the chat
        template after it easily exceeds 64 tokens; rows beyond the bound
        are simply not used, and cost grows linearly with it.
    """

    mamba_mode: str = "decay_free"
    use_dt: bool = True
    absolute: bool = True
    normalize_rows: bool = True
    reduce: str = "mean"
    max_query: int = 128

    def __post_init__(self):
        if self.mamba_mode not in MAMBA_MODES:
            raise ValueError(f"ScoreConfig.mamba_mode={self.mamba_mode!r}; use one of {MAMBA_MODES}")
        if self.reduce not in REDUCES:
            raise ValueError(f"ScoreConfig.reduce={self.reduce!r}; use one of {REDUCES}")
        if self.max_query < 1:
            raise ValueError(f"ScoreConfig.max_query={self.max_query} must be >= 1")


# ----------------------------------------------------------------------------- helpers


def _query_rows_mask(query_mask, b, t, num_query):
    """(b, t) bool or None -> (b, num_query) bool for the last num_query rows."""
    if not 1 <= num_query <= t:
        raise ValueError(f"num_query={num_query} must be in [1, t={t}]")
    if query_mask is None:
        return jnp.ones((b, num_query), bool)
    return query_mask[:, t - num_query:].astype(bool)


def _key_blocks(block_k, t, arrays):
    """Pads the key axis (1) of each array to a multiple of the block and
    moves the block index to the front: (b, t, ...) -> (c, b, block, ...)."""
    block_k = min(block_k, t)
    pad = (-t) % block_k
    out = []
    for a in arrays:
        if pad:
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        out.append(rearrange(a, "b (c j) ... -> c b j ...", j=block_k))
    return out, block_k


def _reduce_rows(s, qmask, reduce):
    """Folds heads and query rows: s (b, H, Q, J), qmask (b, Q) -> (b, J).

    Rows outside `qmask` do not count; with no query row at all the result is 0.
    """
    w = qmask[:, None, :, None]
    count = qmask.sum(-1)  # (b,)
    if reduce == "mean":
        total = jnp.where(w, s, 0.0).sum((1, 2))
        return total / jnp.maximum(count * s.shape[1], 1)[:, None]
    best = jnp.where(w, s, -jnp.inf).max((1, 2))
    return jnp.where(count[:, None] > 0, best, 0.0)


def _unblock(out, t):
    """(c, b, block) -> (b, t)."""
    return rearrange(out, "c b j -> b (c j)")[:, :t]


# ----------------------------------------------------------------------------- attention


def attention_scores(q, k, *, num_query, visual_mask, scale, query_mask=None, key_valid=None,
                     cfg: ScoreConfig = ScoreConfig(), block_k: int = 2048):
    """Attention from the query rows to the visual keys.

    Args:
      q: (b, t_q, n, d) queries of the attention layer (after any projection)
        at the sequence's last t_q >= num_query positions (t_q = t: all of them).
      k: (b, t, kv, d) keys, kv dividing n (GQA: query head i uses kv head
        i // (n // kv), the layout of `hybridvlm.ops.attention`).
      num_query: static; the last num_query positions are the query rows.
      visual_mask: (b, t) bool, True at visual tokens.
      scale: logit scale (1 / sqrt(d) for the Nemotron-H attention).
      query_mask: (b, t) bool or None; only its last num_query columns are
        read (True: a real query token). None: all of them.
      key_valid: (b, t) bool or None; False keys (padding) get no attention.
      cfg: aggregation options (`mamba_*` fields unused; `absolute` is a no-op).
      block_k: static key block size.
    Returns:
      (b, t) float32 scores, 0 at non-visual / invalid positions.
    """
    b, t, kv, _ = k.shape
    n = q.shape[2]
    if not 1 <= num_query <= q.shape[1]:
        raise ValueError(f"num_query={num_query} must be in [1, {q.shape[1]}] (the query rows given)")
    qmask = _query_rows_mask(query_mask, b, t, num_query)
    if key_valid is None:
        key_valid = jnp.ones((b, t), bool)
    visual = visual_mask.astype(bool) & key_valid.astype(bool)

    qg = rearrange(q[:, q.shape[1] - num_query:], "b q (k r) d -> b k r q d", k=kv)
    q_pos = jnp.arange(t - num_query, t)
    (kb, validb, visb, posb), block_k = _key_blocks(
        block_k, t, [k, key_valid, visual, jnp.broadcast_to(jnp.arange(t), (b, t))])

    def logits(kj, validj, posj):
        """(b, block, kv, d) -> masked logits (b, k, r, Q, block) and the mask."""
        sc = jnp.einsum("bkrqd,bjkd->bkrqj", qg, kj, preferred_element_type=jnp.float32) * scale
        mask = validj[:, None, :] & (posj[:, None, :] <= q_pos[None, :, None])  # (b, Q, block)
        mask = mask[:, None, None]
        return jnp.where(mask, sc, _NEG), mask

    # Pass 1: online softmax statistics over all visible keys, plus the share
    # of the (unnormalised) mass on visual keys for `normalize_rows`.
    def stats(carry, blk):
        m, l_all, l_vis = carry
        kj, validj, visj, posj = blk
        sc, mask = logits(kj, validj, posj)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.where(mask, jnp.exp(sc - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_all = l_all * corr + p.sum(-1)
        l_vis = l_vis * corr + jnp.where(visj[:, None, None, None, :], p, 0.0).sum(-1)
        return (m_new, l_all, l_vis), None

    shape = (b, kv, n // kv, num_query)
    init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))
    (m, l_all, l_vis), _ = jax.lax.scan(stats, init, (kb, validb, visb, posb))
    denom = l_vis if cfg.normalize_rows else l_all
    denom = jnp.maximum(denom, _TINY)

    # Pass 2: normalised probabilities of each key block, folded at once.
    def block_scores(_, blk):
        kj, validj, visj, posj = blk
        sc, mask = logits(kj, validj, posj)
        p = jnp.where(mask & visj[:, None, None, None, :], jnp.exp(sc - m[..., None]), 0.0)
        p = p / denom[..., None]
        return None, _reduce_rows(rearrange(p, "b k r q j -> b (k r) q j"), qmask, cfg.reduce)

    _, out = jax.lax.scan(block_scores, None, (kb, validb, visb, posb))
    return jnp.where(visual, _unblock(out, t), 0.0)


# ----------------------------------------------------------------------------- Mamba-2


def _suffix_decay(dt, A):
    """S[j] = sum_{k > j} dt_k A: (b, t, h) float32.

    Then sum_{k=j+1..q} dt_k A = S[j] - S[q]. Suffix sums (rather than prefix
    sums) are small near the end of the sequence, where the query rows are,
    so the differences that matter are exact to float32 precision; far-back
    keys have large |S| but their decay underflows to 0 anyway.
    """
    dA = dt * A[None, None, :]
    inclusive = jnp.cumsum(dA[:, ::-1], axis=1)[:, ::-1]
    return jnp.concatenate([inclusive[:, 1:], jnp.zeros_like(inclusive[:, :1])], axis=1)


def _mamba_block(Cq, q_pos, Sq, Bk, dtk, Sk, k_pos, *, mode, use_dt):
    """Implicit-attention scores of query rows against one key block.

    Args:
      Cq: (b, Q, g, n); q_pos: (Q,); Sq: (b, Q, h) suffix decay sums.
      Bk: (b, J, g, n); dtk: (b, J, h); Sk: (b, J, h); k_pos: (b, J).
    Returns:
      (b, H, Q, J) float32 with H = g ("decay_free") or h ("decay"); 0 where
      k_pos > q_pos (the SSD is causal).
    """
    g = Cq.shape[2]
    causal = (k_pos[:, None, :] <= q_pos[None, :, None])[:, None]  # (b, 1, Q, J)
    cb = jnp.einsum("bqgn,bjgn->bgqj", Cq, Bk, preferred_element_type=jnp.float32)
    if mode == "decay_free":
        if use_dt:
            dt_group = rearrange(dtk, "b j (g r) -> b g r j", g=g).mean(2)  # (b, g, J)
            cb = cb * dt_group[:, :, None, :]
        return jnp.where(causal, cb, 0.0)
    seg = rearrange(Sk, "b j h -> b h 1 j") - rearrange(Sq, "b q h -> b h q 1")  # (b, h, Q, J)
    seg = jnp.where(causal, seg, 0.0)  # j > q is masked below; keep exp finite.
    m = rearrange(jnp.exp(seg) * rearrange(dtk, "b j h -> b h 1 j"), "b (g r) q j -> b g r q j", g=g)
    m = m * cb[:, :, None]
    return jnp.where(causal, rearrange(m, "b g r q j -> b (g r) q j"), 0.0)


def implicit_attention_matrix(C, B, dt, A):
    """The exact Mamba-2 implicit attention matrix (the SSD without the D skip).

    M[b, h, i, j] = (C_i . B_j) exp(A_h sum_{k=j+1..i} dt_k) dt_j for j <= i,
    else 0, with head h reading B/C group h // (h_total // g); then
    y[b, i, h, :] = sum_j M[b, h, i, j] x[b, j, h, :]. Forms the (t, t)
    matrix: meant for tests and small inputs.

    Args:
      C, B: (b, t, g, n); dt: (b, t, h) after softplus; A: (h,) negative.
    Returns:
      (b, h, t, t) float32.
    """
    C, B, dt, A = (v.astype(jnp.float32) for v in (C, B, dt, A))
    b, t = dt.shape[:2]
    S = _suffix_decay(dt, A)
    pos = jnp.arange(t)
    return _mamba_block(C, pos, S, B, dt, S, jnp.broadcast_to(pos, (b, t)), mode="decay", use_dt=True)


def mamba_scores(C, B, dt, A, *, num_query, visual_mask, query_mask=None, key_valid=None,
                 cfg: ScoreConfig = ScoreConfig(), block_k: int = 2048):
    """Implicit-attention scores of a Mamba-2 layer from the query rows.

    Args:
      C, B: (b, t, g, n) output / input projections (g B/C groups) as the
        mixer computes them (after the conv and activation).
      dt: (b, t, h) step after softplus (h heads, g dividing h).
      A: (h,) negative decay rates (-exp(A_log)).
      num_query, visual_mask, query_mask, key_valid, block_k: as in
        `attention_scores`.
      cfg: `mamba_mode`, `use_dt`, `absolute`, `normalize_rows`, `reduce`.
        Aggregation runs over the g groups (decay_free) or the h heads
        (decay) and the query rows.
    Returns:
      (b, t) float32 scores, 0 at non-visual / invalid positions.
      Cost O(num_query * t * n) per group (decay_free), plus
      O(num_query * t) per head for the decay.
    """
    C, B, dt, A = (v.astype(jnp.float32) for v in (C, B, dt, A))
    b, t = dt.shape[:2]
    qmask = _query_rows_mask(query_mask, b, t, num_query)
    visual = visual_mask.astype(bool)
    if key_valid is not None:
        visual = visual & key_valid.astype(bool)

    S = _suffix_decay(dt, A)
    Cq, Sq = C[:, t - num_query:], S[:, t - num_query:]
    q_pos = jnp.arange(t - num_query, t)
    (Bb, dtb, Sb, visb, posb), block_k = _key_blocks(
        block_k, t, [B, dt, S, visual, jnp.broadcast_to(jnp.arange(t), (b, t))])

    def block_raw(blk):
        Bj, dtj, Sj, visj, posj = blk
        s = _mamba_block(Cq, q_pos, Sq, Bj, dtj, Sj, posj, mode=cfg.mamba_mode, use_dt=cfg.use_dt)
        if cfg.absolute:
            s = jnp.abs(s)
        return jnp.where(visj[:, None, None, :], s, 0.0)

    blocks = (Bb, dtb, Sb, visb, posb)
    if cfg.normalize_rows:
        # Pass 1: per-row L1 norm over the visual keys. The L1 (not the plain
        # sum) keeps the division well defined when absolute=False.
        def row_norm(acc, blk):
            return acc + jnp.abs(block_raw(blk)).sum(-1), None

        heads = C.shape[2] if cfg.mamba_mode == "decay_free" else dt.shape[2]
        norm, _ = jax.lax.scan(row_norm, jnp.zeros((b, heads, num_query), jnp.float32), blocks)
        norm = jnp.maximum(norm, _TINY)[..., None]
    else:
        norm = 1.0

    def block_scores(_, blk):
        return None, _reduce_rows(block_raw(blk) / norm, qmask, cfg.reduce)

    _, out = jax.lax.scan(block_scores, None, blocks)
    return jnp.where(visual, _unblock(out, t), 0.0)
