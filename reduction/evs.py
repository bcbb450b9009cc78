"""Efficient Video Sampling (EVS): query-agnostic pruning of static video tokens.

Applied before the LM to one video's tubelet embeddings, following
`compute_retention_mask` of HF transformers' `nemotron_h_omni`:

  * score of token (i, p) = 1 - cos(e[i, p], e[i-1, p]): how much the token at
    spatial position p changed since the previous tubelet;
  * every token of the first tubelet is kept (its score is +inf; the
    reference uses 255, above any 1 - cos <= 2, so the order is the same);
  * the k highest scores over the whole video are kept, ties going to the
    earlier token (the reference's stable descending argsort; `lax.top_k`
    documents the same tie order), with
        k = max(tokens_per_tubelet, int(num_tubelets * tokens_per_tubelet * (1 - rate)))
    -- Python float arithmetic, truncated toward zero, never fewer than one
    tubelet. Truncation of the float product means e.g. 10 x 9 tokens at
    rate 0.3 keep 62, not 63 (90 * (1 - 0.3) = 62.99999999999999): reproduced
    exactly.

k depends only on static shapes and the rate, so the mask and the kept
indices have static shapes under jit. For a batch of videos with equal
shapes, `jax.vmap` these functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# torch.nn.functional.cosine_similarity's default: each norm is clamped to eps.
_COS_EPS = 1e-8


def evs_keep_count(num_tubelets: int, tokens_per_tubelet: int, rate: float) -> int:
    """Number of tokens EVS keeps, exactly as the reference computes it.

    Args:
      num_tubelets, tokens_per_tubelet: the video's static token grid.
      rate: pruning rate in [0, 1], the fraction of tokens to remove.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"EVS pruning rate must be in [0, 1], got {rate}")
    if num_tubelets < 1 or tokens_per_tubelet < 1:
        raise ValueError(f"EVS needs >= 1 tubelet and token, got {num_tubelets} x {tokens_per_tubelet}")
    # Same expression and evaluation order as the reference: (T * P) * (1 - q).
    return max(tokens_per_tubelet, int(num_tubelets * tokens_per_tubelet * (1 - rate)))


def evs_scores(embeds):
    """Dissimilarity to the same position in the previous tubelet.

    Args:
      embeds: (tubelets, tokens_per_tubelet, d) one video's embeddings.
    Returns:
      (tubelets * tokens_per_tubelet,) float32, +inf for the first tubelet.
    """
    e = embeds.astype(jnp.float32)
    unit = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), _COS_EPS)
    cos = jnp.einsum("tpd,tpd->tp", unit[1:], unit[:-1])
    first = jnp.full((1, e.shape[1]), jnp.inf, jnp.float32)
    return jnp.concatenate([first, 1.0 - cos], axis=0).reshape(-1)


def evs_keep_indices(embeds, rate: float):
    """Indices of the kept tokens in their original order: (k,) int32, k static."""
    t, p = embeds.shape[:2]
    k = evs_keep_count(t, p, rate)
    _, idx = jax.lax.top_k(evs_scores(embeds), k)
    return jnp.sort(idx).astype(jnp.int32)


def evs_retention_mask(embeds, rate: float, *, num_real=None):
    """The EVS retention mask of one video.

    Args:
      embeds: (tubelets, tokens_per_tubelet, d).
      rate: static pruning rate in [0, 1].
      num_real: optional () int, traced allowed: only the first `num_real`
        tubelets are real, the rest pad the video to its frame bucket. The
        real tokens kept are then exactly those the real tubelets alone
        would keep (`evs_keep_count(num_real, ...)` of them, same rule);
        the static total is filled with padding tokens first, and only when
        those run out with the next real tokens by score.
    Returns:
      (tubelets * tokens_per_tubelet,) bool, True for kept tokens; exactly
      `evs_keep_count(tubelets, ...)` entries are True.
    """
    t, p = embeds.shape[:2]
    if num_real is None:
        return jnp.zeros((t * p,), bool).at[evs_keep_indices(embeds, rate)].set(True)
    k = evs_keep_count(t, p, rate)
    real = jnp.repeat(jnp.arange(t) < num_real, p)  # (t * p,)
    scores = jnp.where(real, evs_scores(embeds), -jnp.inf)
    # Rank of each token in the reference's stable descending order.
    rank = jnp.zeros((t * p,), jnp.int32).at[jnp.argsort(-scores, stable=True)].set(jnp.arange(t * p, dtype=jnp.int32))
    # Keep counts of every possible real length, computed as the reference does (Python floats).
    table = jnp.asarray([0] + [evs_keep_count(n, p, rate) for n in range(1, t + 1)], jnp.int32)
    retained = real & (rank < table[num_real])
    # Static total: retained, then padding tokens, then the next real ones (earlier rank first).
    priority = jnp.where(retained, 2.0 * t * p, jnp.where(real, -rank.astype(jnp.float32), t * p))
    _, idx = jax.lax.top_k(priority, k)
    return jnp.zeros((t * p,), bool).at[idx].set(True)
