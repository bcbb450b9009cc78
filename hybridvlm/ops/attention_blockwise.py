"""Blockwise (flash) attention whose forward and backward both use memory linear in length.

Forward: queries are processed block by block (a `fori_loop` writing each
block's output into one buffer) and, for each query block, key blocks are
folded in with a running max / running sum (online softmax). Besides the
output it returns the per-row logsumexp of the scores, float32 (b, n, t).

Backward (`jax.custom_vjp`, FlashAttention-2): autodiff through the forward's
loops would store every block's probabilities, i.e. O(t * s) memory (3.3 GiB
at 8k tokens, 12.7 GiB at 16k with 4 heads of 128). Instead only q, k, v,
the output and the logsumexp are saved, and the backward recomputes each
block's probabilities P = exp(S - lse) from them:

    D   = rowsum(dO * O)                       (b, n, t)
    for each key block j, for each query block i:
      P   = exp(S_ij - lse_i)                  (masked entries 0)
      dV_j += P^T dO_i;   dP = dO_i V_j^T
      dS  = P * (dP - D_i) * scale
      dQ_i += dS K_j;     dK_j += dS^T Q_i

dK_j and dV_j live in the inner loop's carry (one key block), dQ in a
(b, t, n, d) float32 buffer, so temporaries are O(block_q * block_k * n)
plus O(t * n * d). With grouped-query attention the einsums sum dK / dV over
the query heads that share a kv head.

Masking is by positions (see `visible`). Key blocks that a query block
cannot see at all (e.g. the future, under causality) are skipped with
`lax.cond` in both directions. A query row that sees no key gets output 0,
logsumexp 0 and zero gradients (no NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

# Finite "minus infinity" for masked scores: exp() of it is exactly 0 and
# differences of it stay finite, so no inf - inf = NaN appears anywhere.
_NEG = -1e30


def visible(q_pos, k_pos, k_valid):
    """Which keys each query sees: (b, t), (b, s), (b, s) -> (b, t, s) bool.

    Key j is visible to query i  <=>  k_valid[j] and k_pos[j] <= q_pos[i].
    """
    return (k_pos[:, None, :] <= q_pos[:, :, None]) & k_valid[:, None, :]


def attention_blockwise(q, k, v, *, q_pos, k_pos, k_valid, scale, block_q=512, block_k=512):
    """Masked grouped-query flash attention, differentiable in q, k, v.

    Args:
      q: (b, t, n, d); k, v: (b, s, kv, d) with kv dividing n (query head h
        reads kv head h // (n // kv)). Any float dtype; scores, softmax
        statistics and gradients accumulate in float32.
      q_pos: (b, t) int; k_pos: (b, s) int; k_valid: (b, s) bool. Not
        differentiable (their cotangents are zero).
      scale: static Python float multiplying the scores.
      block_q, block_k: static tile sizes (clipped to t and s); lengths need
        not be multiples of them.
    Returns:
      (b, t, n, d) in q's dtype; rows that see no key are 0.
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"attention: {kv} kv heads must divide {n} query heads")
    block_q, block_k = min(block_q, t), min(block_k, s)
    pad_t, pad_s = (-t) % block_q, (-s) % block_k
    q_pos, k_pos, k_valid = jnp.asarray(q_pos), jnp.asarray(k_pos), jnp.asarray(k_valid)
    if pad_t:
        q = jnp.pad(q, [(0, 0), (0, pad_t), (0, 0), (0, 0)])
        # Padded queries sit at the lowest position: they see no key, so
        # their blocks are skipped like fully masked ones.
        q_pos = jnp.pad(q_pos, [(0, 0), (0, pad_t)], constant_values=jnp.iinfo(q_pos.dtype).min)
    if pad_s:
        k = jnp.pad(k, [(0, 0), (0, pad_s), (0, 0), (0, 0)])
        v = jnp.pad(v, [(0, 0), (0, pad_s), (0, 0), (0, 0)])
        k_pos = jnp.pad(k_pos, [(0, 0), (0, pad_s)])
        k_valid = jnp.pad(k_valid, [(0, 0), (0, pad_s)])  # padded keys are invalid
    out = _flash(q, k, v, q_pos, k_pos, k_valid, float(scale), block_q, block_k)
    return out[:, :t]


def attention_blockwise_with_lse(q, k, v, *, q_pos, k_pos, k_valid, scale, block_q, block_k):
    """Forward only, on block-aligned inputs: output and per-row logsumexp.

    Args:
      q: (b, t, n, d), t a multiple of block_q; k, v: (b, s, kv, d), s a
        multiple of block_k; q_pos (b, t), k_pos (b, s) int; k_valid (b, s).
    Returns:
      out (b, t, n, d) in q's dtype and lse (b, n, t) float32, the log of the
      row's softmax denominator (0 on rows that see no key).
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    slice_q = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block_q, axis=1)
    slice_k = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block_k, axis=1)

    def query_block(i, bufs):
        out_buf, lse_buf = bufs
        start = i * block_q
        qi = rearrange(slice_q(q, start), "b i (k r) d -> b i k r d", k=kv)
        qpi = slice_q(q_pos, start)

        def key_block(j, carry):
            kj, vj = slice_k(k, j * block_k), slice_k(v, j * block_k)  # (b, j, k, d)
            mask = visible(qpi, slice_k(k_pos, j * block_k), slice_k(k_valid, j * block_k))  # (b, i, j)

            def update(carry):
                m, l, acc = carry  # (b, k, r, i), (b, k, r, i), (b, k, r, i, d)
                sc = jnp.einsum("bikrd,bjkd->bkrij", qi, kj, preferred_element_type=jnp.float32) * scale
                sc = jnp.where(mask[:, None, None], sc, _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                # Masked entries are exactly 0 (not exp(_NEG - _NEG) = 1 on a
                # row that has seen nothing yet), so such rows keep l = 0.
                p = jnp.where(mask[:, None, None], jnp.exp(sc - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkrij,bjkd->bkrid", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            return jax.lax.cond(mask.any(), update, lambda c: c, carry)

        shape = (b, kv, n // kv, block_q)
        init = (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (d,), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, k.shape[1] // block_k, key_block, init)
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        out = rearrange(acc / l_safe[..., None], "b k r i d -> b i (k r) d")
        lse = rearrange(jnp.where(seen, m + jnp.log(l_safe), 0.0), "b k r i -> b (k r) i")
        out_buf = jax.lax.dynamic_update_slice_in_dim(out_buf, out.astype(out_buf.dtype), start, axis=1)
        return out_buf, jax.lax.dynamic_update_slice_in_dim(lse_buf, lse, start, axis=2)

    # Both buffers start as data (a copy of q, a slice of it), not as zero
    # broadcasts, which XLA may hoist to the program start for every layer
    # (see hybridvlm/ops/blocks.py); every entry is overwritten.
    out_buf = q
    lse_buf = rearrange(q[..., 0], "b t n -> b n t").astype(jnp.float32)
    return jax.lax.fori_loop(0, t // block_q, query_block, (out_buf, lse_buf))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, q_pos, k_pos, k_valid, scale, block_q, block_k):
    """Block-aligned attention output (b, t, n, d); see `attention_blockwise`."""
    out, _ = attention_blockwise_with_lse(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale,
                                          block_q=block_q, block_k=block_k)
    return out


def _flash_fwd(q, k, v, q_pos, k_pos, k_valid, scale, block_q, block_k):
    out, lse = attention_blockwise_with_lse(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=scale,
                                            block_q=block_q, block_k=block_k)
    # Residuals are O(t * n * d): the probabilities are recomputed.
    return out, (q, k, v, q_pos, k_pos, k_valid, out, lse)


def _flash_bwd(scale, block_q, block_k, res, d_out):
    """Cotangents of (q, k, v); None (zero) for the positions and the key mask."""
    q, k, v, q_pos, k_pos, k_valid, out, lse = res
    dq, dk, dv = attention_blockwise_backward(q, k, v, out, lse, d_out, q_pos=q_pos, k_pos=k_pos,
                                              k_valid=k_valid, scale=scale, block_q=block_q, block_k=block_k)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention_blockwise_backward(q, k, v, out, lse, d_out, *, q_pos, k_pos, k_valid, scale, block_q, block_k):
    """FlashAttention-2 backward on block-aligned inputs.

    Args:
      q: (b, t, n, d); k, v: (b, s, kv, d); out, d_out: (b, t, n, d);
      lse: (b, n, t) float32 from `attention_blockwise_with_lse`;
      q_pos, k_pos, k_valid, scale, block_q, block_k: as there.
    Returns:
      dq (b, t, n, d), dk, dv (b, s, kv, d), in the dtypes of q, k, v.
    """
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    r = n // kv
    slice_q = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block_q, axis=1)
    slice_k = functools.partial(jax.lax.dynamic_slice_in_dim, slice_size=block_k, axis=1)
    # D = rowsum(dO * O): the softmax backward's per-row term, (b, n, t).
    delta = jnp.einsum("btnd,btnd->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(j, bufs):
        dq_buf, dk_buf, dv_buf = bufs
        kstart = j * block_k
        kj, vj = slice_k(k, kstart), slice_k(v, kstart)  # (b, j, k, d)
        kpj, kvj = slice_k(k_pos, kstart), slice_k(k_valid, kstart)

        def query_block(i, carry):
            dq_buf, dk_j, dv_j = carry
            qstart = i * block_q
            qi = rearrange(slice_q(q, qstart), "b i (k r) d -> b i k r d", k=kv)
            doi = rearrange(slice_q(d_out, qstart), "b i (k r) d -> b i k r d", k=kv)
            lse_i = rearrange(jax.lax.dynamic_slice_in_dim(lse, qstart, block_q, axis=2), "b (k r) i -> b k r i", k=kv)
            delta_i = rearrange(jax.lax.dynamic_slice_in_dim(delta, qstart, block_q, axis=2), "b (k r) i -> b k r i",
                                k=kv)
            mask = visible(slice_q(q_pos, qstart), kpj, kvj)[:, None, None]  # (b, 1, 1, i, j)

            def grads(_):
                sc = jnp.einsum("bikrd,bjkd->bkrij", qi, kj, preferred_element_type=jnp.float32) * scale
                # Masking before exp keeps garbage scores (padded keys) from
                # overflowing; rows that see nothing get P = 0 everywhere.
                p = jnp.exp(jnp.where(mask, sc - lse_i[..., None], _NEG))
                dv_c = jnp.einsum("bkrij,bikrd->bjkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bikrd,bjkd->bkrij", doi, vj, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None]) * scale
                dq_c = jnp.einsum("bkrij,bjkd->bikrd", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32)
                dk_c = jnp.einsum("bkrij,bikrd->bjkd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32)
                return dq_c, dk_c, dv_c

            def no_grads(_):
                return (jnp.zeros((b, block_q, kv, r, d), jnp.float32), jnp.zeros((b, block_k, kv, d), jnp.float32),
                        jnp.zeros((b, block_k, kv, d), jnp.float32))

            dq_c, dk_c, dv_c = jax.lax.cond(mask.any(), grads, no_grads, None)
            # The first key block overwrites dq (the buffer starts as a copy
            # of q, see below); later ones accumulate. A select, so whatever
            # the buffer held (inf, NaN) cannot leak in.
            dq_i = jnp.where(j == 0, 0.0, slice_q(dq_buf, qstart)) + rearrange(dq_c, "b i k r d -> b i (k r) d")
            dq_buf = jax.lax.dynamic_update_slice_in_dim(dq_buf, dq_i, qstart, axis=1)
            return dq_buf, dk_j + dk_c, dv_j + dv_c

        zeros = jnp.zeros((b, block_k, kv, d), jnp.float32)
        dq_buf, dk_j, dv_j = jax.lax.fori_loop(0, t // block_q, query_block, (dq_buf, zeros, zeros))
        dk_buf = jax.lax.dynamic_update_slice_in_dim(dk_buf, dk_j.astype(dk_buf.dtype), kstart, axis=1)
        dv_buf = jax.lax.dynamic_update_slice_in_dim(dv_buf, dv_j.astype(dv_buf.dtype), kstart, axis=1)
        return dq_buf, dk_buf, dv_buf

    # Buffers start as data (copies of q, k, v) rather than zero broadcasts,
    # which XLA may hoist to the program start for every layer (see
    # hybridvlm/ops/blocks.py); dk / dv blocks are each written once, dq
    # blocks are reset by the first key block. dq accumulates in float32.
    dq, dk, dv = jax.lax.fori_loop(0, s // block_k, key_block, (q.astype(jnp.float32), k, v))
    return dq.astype(q.dtype), dk, dv
