"""Masked grouped-query attention: a naive path, a blockwise flash path, and the dispatch.

The mask is given by positions, which serves prefill, decoding against a
preallocated cache and (later) pruned sequences alike:

    key j is visible to query i  <=>  k_valid[j] and k_pos[j] <= q_pos[i].

`attention_naive` materialises the (t, s) scores: the reference, and the
fastest for short sequences. `attention_blockwise` (hybridvlm/ops/
attention_blockwise.py) never does, forward or backward (a custom VJP that
recomputes block probabilities from the saved logsumexp), so memory grows
linearly with sequence length. Library kernels for prompts (cuDNN, Pallas
splash) live in hybridvlm/ops/attention_library.py; the attention layer
calls them for prompts only, since they express the mask by index.

The two differ only on query rows that see no key (padding): the naive path
averages all values there (like the reference's min-dtype mask), the
blockwise path returns 0 with zero gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from hybridvlm.ops.attention_blockwise import attention_blockwise, visible

__all__ = ["attention", "attention_blockwise", "attention_naive"]

# Finite "minus infinity": fully masked rows stay NaN-free (they average the
# values, like the reference's min-dtype mask; such rows are padding).
_NEG = -1e30
# Up to this many score entries per (batch, head), "auto" uses the naive path.
_NAIVE_MAX_SCORES = 2048 * 2048


def attention_naive(q, k, v, *, q_pos, k_pos, k_valid, scale):
    """Reference attention: full (t, s) scores in float32.

    Args:
      q: (b, t, n, d); k, v: (b, s, kv, d) with kv dividing n.
      q_pos: (b, t) int; k_pos: (b, s) int; k_valid: (b, s) bool.
    Returns:
      (b, t, n, d) in q's dtype.
    """
    kv = k.shape[2]
    qg = rearrange(q, "b t (k r) d -> b t k r d", k=kv)
    scores = jnp.einsum("btkrd,bskd->bkrts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = visible(q_pos, k_pos, k_valid)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("bkrts,bskd->btkrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return rearrange(out, "b t k r d -> b t (k r) d").astype(q.dtype)


def attention(q, k, v, *, q_pos, k_pos, k_valid, scale, impl="auto", block_q=512, block_k=512):
    """Dispatches to the naive or blockwise path (see module docstring).

    impl: "naive", "blockwise", or "auto": naive up to 2048 * 2048 scores per
    (batch, head), blockwise beyond.
    """
    if impl == "auto":
        impl = "naive" if q.shape[1] * k.shape[1] <= _NAIVE_MAX_SCORES else "blockwise"
    if impl == "naive":
        return attention_naive(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale)
    if impl == "blockwise":
        return attention_blockwise(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale,
                                   block_q=block_q, block_k=block_k)
    raise ValueError(f"attention_impl: unknown implementation {impl!r}")
