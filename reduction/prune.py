"""Static-shape selection of the tokens a reduction stage keeps (pure array code).

The model lays each row out with the same number of visual *slots* (the frame
bucket): real visual tokens, plus masked slots where a row's video is shorter
than the bucket (`attention_mask` 0 there, so they are never attended). A stage
that keeps `keep` of `num_visual` slots drops exactly `num_visual - keep`
tokens from every row, so every shape depends only on the plan. Which ones,
first to last:

  1. masked visual slots;
  2. real visual tokens, lowest rank first (the stage's selector: scores,
     evenly spaced, or random);
  3. other invalid tokens (left padding), only for a row that holds fewer
     slots than the stage drops;
  4. text, only for a row that holds fewer slots and padding than the stage
     drops (eager calls refuse such rows before anything runs; see
     `hybridvlm.lm.NemotronHForCausalLM.check_inputs`).

So a row of the bucket's layout keeps its top `min(keep, real)` visual tokens
and all of its text, whatever its neighbours hold. Survivors keep their order
(Mamba is order-dependent).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SELECTORS = ("score", "uniform", "random")

# Drop priorities (lower is dropped first). Finite ranks are clipped inside
# +-_RANK_LIMIT so that padding and text always sort above every real token.
_RANK_LIMIT = 1e30
_PADDING = 1e37


def visual_rank(scores, real_visual, keep: int, *, selector: str = "score", key=None):
    """How strongly each real visual token should be kept at this stage.

    Args:
      scores: (b, t) float importance scores (used by "score"; may be None otherwise).
      real_visual: (b, t) bool, the real (unmasked) visual tokens.
      keep: static number of visual tokens the stage keeps per row.
      selector: "score" (top-k of `scores`), "uniform" (evenly spaced in
        visual order, per row over that row's real tokens) or "random"
        (uniformly random subset; needs `key`).
    Returns:
      (b, t) float32, higher = kept first; only entries at real visual tokens matter.
    """
    b, t = real_visual.shape
    if selector == "score":
        if scores is None:
            raise ValueError("selector='score' needs scores")
        return scores.astype(jnp.float32)
    if selector == "random":
        if key is None:
            raise ValueError("selector='random' needs a PRNG key")
        return jax.random.uniform(key, (b, t))
    if selector == "uniform":
        return _evenly_spaced(real_visual, keep).astype(jnp.float32)
    raise ValueError(f"unknown selector {selector!r}; use one of {SELECTORS}")


def _evenly_spaced(real_visual, keep: int):
    """(b, t) bool: per row, the real visual tokens at ranks floor((j + 1/2) n / keep),
    j < keep, n = that row's real count (the centres of `keep` equal segments;
    every token when keep >= n)."""
    b, t = real_visual.shape
    n = jnp.sum(real_visual, axis=1, dtype=jnp.int32)[:, None]  # (b, 1)
    j = jnp.arange(keep, dtype=jnp.int32)[None]  # (1, keep)
    if 2 * keep * t < 2**31:  # exact integer arithmetic while it cannot overflow
        ranks = ((2 * j + 1) * n) // (2 * keep)
    else:  # float32 beyond that: a rank may move by one token
        ranks = jnp.floor((j + 0.5) * (n.astype(jnp.float32) / keep)).astype(jnp.int32)
    positions = jnp.argsort(~real_visual, axis=1, stable=True)  # real visual first, in order
    picked = jnp.take_along_axis(positions, jnp.minimum(ranks, t - 1), axis=1)  # (b, keep)
    chosen = jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], picked].set(True)
    return chosen & real_visual


def drop_priority(rank, visual, valid):
    """Per-token priority of staying (lower is dropped first).

    Args:
      rank: (b, t) float, `visual_rank` of the stage.
      visual: (b, t) bool visual slots (real and masked).
      valid: (b, t) bool, False on padding and masked slots.
    Returns:
      (b, t) float32: -inf masked slots < real visual (rank) < padding < +inf text.
    """
    real = visual & valid
    rank = jnp.clip(jnp.nan_to_num(rank.astype(jnp.float32), nan=-_RANK_LIMIT), -_RANK_LIMIT, _RANK_LIMIT)
    pri = jnp.where(valid, jnp.inf, _PADDING)  # text, padding
    pri = jnp.where(real, rank, pri)
    return jnp.where(visual & ~valid, -jnp.inf, pri)


def compaction_order(keep_mask, new_len: int):
    """(b, t) bool with `new_len` True per row -> (b, new_len) their indices, ascending."""
    # Stable argsort of "dropped" puts kept positions first, in original order.
    return jnp.argsort(~keep_mask, axis=1, stable=True)[:, :new_len].astype(jnp.int32)


def keep_order(priority, num_dropped: int):
    """Indices (b, t - num_dropped) of the tokens that stay, in sequence order.

    The `num_dropped` lowest-priority tokens of each row go (ties: the earlier
    token goes first).
    """
    b, t = priority.shape
    if num_dropped == 0:
        return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    _, dropped = jax.lax.top_k(-priority, num_dropped)  # (b, num_dropped)
    stays = jnp.ones((b, t), bool).at[jnp.arange(b)[:, None], dropped].set(False)
    return compaction_order(stays, t - num_dropped)


def stage_order(scores, visual, valid, keep: int, *, num_visual: int, selector: str = "score", key=None):
    """The tokens one stage keeps: (b, t - (num_visual - keep)) indices, ascending.

    Args:
      scores: (b, t) importance scores (selector "score"), else None.
      visual: (b, t) bool visual slots; a row of the bucket's layout has
        exactly `num_visual` of them (static).
      valid: (b, t) bool, False on padding and masked slots.
      keep: static visual slots kept per row.
      selector, key: as in `visual_rank`.
    """
    if not 0 < keep <= num_visual:
        raise ValueError(f"a stage keeps 1..{num_visual} visual tokens, got keep={keep}")
    rank = visual_rank(scores, visual & valid, keep, selector=selector, key=key)
    return keep_order(drop_priority(rank, visual, valid), num_visual - keep)
