"""Static-shape pruning of visual tokens inside the LM forward pass.

Before a plan layer, every row keeps exactly `keep` of its visual tokens
(top-k of that layer's scores, or the uniform / random baselines), all its
text and padding tokens, in their original order (Mamba is order-dependent).
Every shape depends only on the plan, so a second video and question of the
same shapes reuse the compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hybridvlm.cache import Layout


def select_visual(scores, visual, keep: int, *, num_visual: int, selector: str = "score", key=None):
    """Chooses `keep` visual tokens per row.

    Args:
      scores: (b, t) float, higher = more important (used by "score").
      visual: (b, t) bool with exactly `num_visual` True per row (static).
      keep: static number of visual tokens kept per row.
      selector: "score" (top-k), "uniform" (evenly spaced in visual order)
        or "random" (uniformly random subset; needs `key`).
    Returns:
      (b, t) bool: True on the kept visual tokens.
    """
    b, t = visual.shape
    if selector == "score":
        ranked = jnp.where(visual, scores.astype(jnp.float32), -jnp.inf)
    elif selector == "random":
        if key is None:
            raise ValueError("selector='random' needs a PRNG key")
        ranked = jnp.where(visual, jax.random.uniform(key, (b, t)), -jnp.inf)
    elif selector == "uniform":
        # Evenly spaced ranks in visual order: the centres of `keep` equal segments.
        ranks = ((np.arange(keep) + 0.5) * num_visual / keep).astype(np.int32)
        order = jnp.cumsum(visual, axis=1) - 1
        return visual & jnp.isin(order, jnp.asarray(ranks))
    else:
        raise ValueError(f"unknown selector {selector!r}; use 'score', 'uniform' or 'random'")
    _, idx = jax.lax.top_k(ranked, keep)  # (b, keep)
    return jnp.zeros((b, t), bool).at[jnp.arange(b)[:, None], idx].set(True)


def compaction_order(keep_mask, new_len: int):
    """(b, t) bool with exactly `new_len` True per row -> (b, new_len) their indices, ascending."""
    # Stable argsort of "dropped" puts kept positions first, in original order.
    return jnp.argsort(~keep_mask, axis=1, stable=True)[:, :new_len].astype(jnp.int32)


def prune(h, layout: Layout, visual, kept_visual, *, num_dropped: int):
    """Drops the visual tokens not in `kept_visual`.

    Args:
      h: (b, t, d) hidden states; layout: their Layout; visual: (b, t) bool.
      kept_visual: (b, t) bool subset of `visual`.
      num_dropped: static number of visual tokens dropped per row.
    Returns:
      h (b, t', d), layout and visual mask for the t' = t - num_dropped survivors.
    """
    keep = ~visual | kept_visual
    order = compaction_order(keep, h.shape[1] - num_dropped)
    h = jnp.take_along_axis(h, order[..., None], axis=1)
    return h, layout.take(order), jnp.take_along_axis(visual, order, axis=1)
