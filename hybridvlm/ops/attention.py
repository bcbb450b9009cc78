"""Masked grouped-query attention: a naive path and a blockwise online-softmax path.

The mask is given by positions, which serves prefill, decoding against a
preallocated cache and (later) pruned sequences alike:

    key j is visible to query i  <=>  k_valid[j] and k_pos[j] <= q_pos[i].

The blockwise path never materialises the (t, s) score matrix: queries are
processed block by block (`map_blocks`: a loop writing each block's output
into one buffer), and for each query block the key
blocks are folded in with a running max / running sum (`lax.scan`), so
memory grows linearly with sequence length. Key blocks that are entirely
masked for a query block (e.g. the future, under causality) are skipped
with `lax.cond`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from hybridvlm.ops.blocks import map_blocks

# Finite "minus infinity": fully masked rows stay NaN-free (they average the
# values, like the reference's min-dtype mask; such rows are padding).
_NEG = -1e30
# Up to this many score entries per (batch, head), "auto" uses the naive path.
_NAIVE_MAX_SCORES = 2048 * 2048


def _mask(q_pos, k_pos, k_valid):
    """(b, t), (b, s), (b, s) -> (b, t, s) bool."""
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]


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
    mask = _mask(q_pos, k_pos, k_valid)[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("bkrts,bskd->btkrd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return rearrange(out, "b t k r d -> b t (k r) d").astype(q.dtype)


def attention_blockwise(q, k, v, *, q_pos, k_pos, k_valid, scale, block_q=512, block_k=512):
    """Online-softmax attention with memory linear in t and s.

    Same arguments and result as `attention_naive`; `block_q`/`block_k` are
    the tile sizes (clipped to the sequence lengths).
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    block_q, block_k = min(block_q, t), min(block_k, s)
    pad_t, pad_s = (-t) % block_q, (-s) % block_k
    if pad_t:
        q = jnp.pad(q, [(0, 0), (0, pad_t), (0, 0), (0, 0)])
        q_pos = jnp.pad(q_pos, [(0, 0), (0, pad_t)])
    if pad_s:
        k = jnp.pad(k, [(0, 0), (0, pad_s), (0, 0), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, pad_s), (0, 0), (0, 0)])
        k_pos = jnp.pad(k_pos, [(0, 0), (0, pad_s)])
        k_valid = jnp.pad(k_valid, [(0, 0), (0, pad_s)])

    # Leading block axes for the key loop (lax.scan).
    kb = rearrange(k, "b (c j) k d -> c b j k d", j=block_k)
    vb = rearrange(v, "b (c j) k d -> c b j k d", j=block_k)
    kpb = rearrange(k_pos, "b (c j) -> c b j", j=block_k)
    kvb = rearrange(k_valid, "b (c j) -> c b j", j=block_k)

    def one_query_block(_, qi, qpi):
        """(b, i, n, d) queries at positions (b, i) -> their output (b, i, n, d)."""
        qi = rearrange(qi, "b i (k r) d -> b i k r d", k=kv)

        def fold_key_block(carry, key_block):
            kj, vj, kpj, kvj = key_block
            mask = _mask(qpi, kpj, kvj)  # (b, i, j)

            def update(carry):
                m, l, acc = carry  # (b, k, r, i), (b, k, r, i), (b, k, r, i, d)
                sc = jnp.einsum("bikrd,bjkd->bkrij", qi, kj, preferred_element_type=jnp.float32) * scale
                sc = jnp.where(mask[:, None, None], sc, _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.exp(sc - m_new[..., None])
                corr = jnp.exp(m - m_new)
                l = l * corr + p.sum(-1)
                pv = jnp.einsum("bkrij,bjkd->bkrid", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l, acc * corr[..., None] + pv

            return jax.lax.cond(mask.any(), update, lambda c: c, carry), None

        shape = (b, kv, n // kv, block_q)
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (d,), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(fold_key_block, init, (kb, vb, kpb, kvb))
        # l >= 1 wherever a key was seen; rows that saw none are padding.
        out = acc / jnp.maximum(l, 1e-30)[..., None]
        return None, rearrange(out, "b k r i d -> b i (k r) d").astype(q.dtype)

    out, _ = map_blocks(one_query_block, q, q_pos, block=block_q)  # (b, t + pad_t, n, d)
    return out[:, :t]


def attention(q, k, v, *, q_pos, k_pos, k_valid, scale, impl="auto", block_q=512, block_k=512):
    """Dispatches to the naive or blockwise path (see module docstring)."""
    if impl == "auto":
        impl = "naive" if q.shape[1] * k.shape[1] <= _NAIVE_MAX_SCORES else "blockwise"
    if impl == "naive":
        return attention_naive(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale)
    if impl == "blockwise":
        return attention_blockwise(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale,
                                   block_q=block_q, block_k=block_k)
    raise ValueError(f"attention_impl: unknown implementation {impl!r}")
