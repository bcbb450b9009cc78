"""Blockwise attention's custom VJP: gradients equal the naive path's, memory is linear."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybridvlm.ops.attention import attention_blockwise, attention_naive

from test_attention import D, qkv

SCALE = D**-0.5


def sees_a_key(q_pos, k_pos, k_valid):
    """(b, t) bool: query rows with at least one visible key."""
    return ((np.asarray(k_pos)[:, None, :] <= np.asarray(q_pos)[:, :, None]) & np.asarray(k_valid)[:, None, :]).any(-1)


@functools.partial(jax.jit, static_argnames=("impl", "block_q", "block_k"))
def grads(q, k, v, w, q_pos, k_pos, k_valid, *, impl, block_q=None, block_k=None):
    """Output and d/d(q, k, v) of sum(w * attention(q, k, v)) (float32 functional)."""
    def f(q, k, v):
        kw = dict(q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, scale=SCALE)
        if impl == "naive":
            return attention_naive(q, k, v, **kw)
        return attention_blockwise(q, k, v, block_q=block_q, block_k=block_k, **kw)

    def loss(q, k, v):
        out = f(q, k, v)
        return jnp.sum(w * out.astype(jnp.float32)), out

    (_, out), g = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, g


def check_against_naive(q, k, v, q_pos, k_pos, k_valid, *, block_q, block_k, tol, seed=0):
    """Blockwise grads == naive grads for a random functional on rows that see a key.

    Rows that see no key differ by design (naive: mean of the values; blockwise:
    0), so the functional's weights are 0 there; the blockwise output and dq
    must be exactly 0 on those rows, and weighting them changes no gradient.
    """
    rows = sees_a_key(q_pos, k_pos, k_valid)
    w = np.random.default_rng(seed + 100).standard_normal(q.shape).astype(np.float32)
    w_rows = w * rows[:, :, None, None]
    _, want = grads(q, k, v, w_rows, q_pos, k_pos, k_valid, impl="naive")
    out, got = grads(q, k, v, w_rows, q_pos, k_pos, k_valid, impl="blockwise", block_q=block_q, block_k=block_k)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == q.dtype and a.shape == b.shape, name
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-6)
        assert err <= tol, f"d{name}: relative error {err:.2e} > {tol:.0e}"
    if not rows.all():
        assert np.all(np.asarray(out, np.float32)[~rows] == 0)
        assert np.all(np.asarray(got[0], np.float32)[~rows] == 0)
        # Cotangents on rows that see nothing reach no gradient, and no NaN.
        _, got_all = grads(q, k, v, w, q_pos, k_pos, k_valid, impl="blockwise", block_q=block_q, block_k=block_k)
        for a, b in zip(got_all, got):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("n,kv", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("block_q,block_k", [(4, 5), (16, 16)], ids=["ragged_blocks", "one_block"])
def test_grads_causal_with_key_padding(n, kv, block_q, block_k):
    """Left-padded prompts (padded query rows see no key), 13 tokens: lengths
    not divisible by the blocks; garbage in padded keys."""
    b, t = 3, 13
    q, k, v = qkv(0, b, t, t, n, kv)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    valid = np.stack([np.arange(t) >= t - m for m in (13, 6, 1)])
    k = np.where(valid[:, :, None, None], k, 1e3).astype(np.float32)
    v = np.where(valid[:, :, None, None], v, -1e3).astype(np.float32)
    check_against_naive(q, k, v, pos, pos, valid, block_q=block_q, block_k=block_k, tol=2e-5)


@pytest.mark.parametrize("t", [1, 3])
def test_grads_decode_against_cache(t):
    """t new queries at positions p..p+t-1 (q_pos offset) against 16 cache
    slots, some invalid, one valid future slot hidden by causality; one row of
    the batch has an invalid first query row (its prompt starts later)."""
    b, s, n, kv = 3, 16, 4, 2
    q, k, v = qkv(1, b, t, s, n, kv)
    p = np.array([5, 9, 12], np.int32)
    q_pos = p[:, None] + np.arange(t, dtype=np.int32)
    k_pos = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))
    k_valid = (k_pos >= np.array([0, 4, 11])[:, None]) & (k_pos < (p + t)[:, None])
    k_valid[0, 14] = True
    k_valid[2, :13] = False  # row 2: only slots >= 13 valid, so its query at 12 sees nothing
    check_against_naive(q, k, v, q_pos, k_pos, k_valid, block_q=2, block_k=5, tol=2e-5)


def test_grads_longer_queries_than_keys_and_prefix_positions():
    """Queries at positions 20..44 after a 20-token prefix cache of 12 valid
    slots (t=25 > s=12), keys at non-contiguous positions (pruned sequence)."""
    b, t, s, n, kv = 2, 25, 12, 4, 2
    q, k, v = qkv(2, b, t, s, n, kv)
    q_pos = np.broadcast_to(np.arange(20, 20 + t, dtype=np.int32), (b, t))
    k_pos = np.broadcast_to(np.array([0, 2, 3, 5, 8, 13, 21, 22, 30, 34, 40, 44], np.int32), (b, s))
    k_valid = np.ones((b, s), bool)
    k_valid[1, :4] = False
    check_against_naive(q, k, v, q_pos, k_pos, k_valid, block_q=8, block_k=5, tol=2e-5)


def test_grads_bfloat16():
    """bf16 inputs: float32 accumulation; compared with the naive path on the
    same bf16 inputs, at a bf16 tolerance."""
    b, t, n, kv = 2, 37, 4, 2
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(3, b, t, t, n, kv))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    valid = np.stack([np.ones(t, bool), np.arange(t) >= 9])
    check_against_naive(q, k, v, pos, pos, valid, block_q=16, block_k=8, tol=3e-2)


# --------------------------------------------------------------------------
# Memory of forward + backward (compiled, never run).
# --------------------------------------------------------------------------
def _grad_temp_bytes(impl, t, *, n=2, kv=1, d=32, block=256):
    def loss(q, k, v):
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        kw = dict(q_pos=pos, k_pos=pos, k_valid=jnp.ones((1, t), bool), scale=d**-0.5)
        if impl == "naive":
            out = attention_naive(q, k, v, **kw)
        else:
            out = attention_blockwise(q, k, v, block_q=block, block_k=block, **kw)
        return jnp.sum(out**2)

    args = (jax.ShapeDtypeStruct((1, t, n, d), jnp.float32),) + (jax.ShapeDtypeStruct((1, t, kv, d), jnp.float32),) * 2
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_backward_memory_is_linear():
    short, long = _grad_temp_bytes("blockwise", 2048), _grad_temp_bytes("blockwise", 4096)
    assert long / short < 2.6, f"blockwise fwd+bwd temp {short} B at 2k -> {long} B at 4k"
    # The quadratic path keeps (n, t, t) float32 probabilities: 128 MiB here.
    naive = _grad_temp_bytes("naive", 4096)
    assert naive > 2 * 4096**2 * 4
    assert long * 10 < naive, f"blockwise {long} B vs naive {naive} B at 4k"
