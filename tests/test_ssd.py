"""Mamba-2 SSD: chunked vs sequential vs an independent numpy recurrence."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hybridvlm.ssd as ssd_module
from hybridvlm.ssd import ssd, ssd_chunked, ssd_sequential, ssd_step

H, P, N = 4, 4, 8  # heads, head_dim, d_state


def make_inputs(seed, *, b=2, l=37, h=H, p=P, g=2, n=N, with_state=False):
    """O(1) inputs; dt log-uniform in [1e-3, 0.5]; A = -exp(.) in [-4, -0.25]."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((b, l, h, p)).astype(f32)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (b, l, h))).astype(f32)
    A = -np.exp(rng.uniform(np.log(0.25), np.log(4.0), (h,))).astype(f32)
    B = rng.standard_normal((b, l, g, n)).astype(f32)
    C = rng.standard_normal((b, l, g, n)).astype(f32)
    s0 = rng.standard_normal((b, h, p, n)).astype(f32) if with_state else None
    return x, dt, A, B, C, s0


def scaled_err(got, want):
    """Max abs error, relative to the output scale when that exceeds 1."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "non-finite values"
    return np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want)))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _both(x, dt, A, B, C, s0, *, chunk_size):
    return (ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=s0),
            ssd_sequential(x, dt, A, B, C, initial_state=s0))


# --------------------------------------------------------------------------
# Independent reference: plain numpy loops, float64, written from the math.
# --------------------------------------------------------------------------
def numpy_ssd(x, dt, A, B, C, s0=None):
    x, dt, A, B, C = (np.asarray(v, np.float64) for v in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    heads_per_group = h // g
    y = np.zeros((b, l, h, p))
    state = np.zeros((b, h, p, n)) if s0 is None else np.array(s0, np.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // heads_per_group
            s = state[bi, hi]
            for t in range(l):
                s = np.exp(dt[bi, t, hi] * A[hi]) * s + dt[bi, t, hi] * np.outer(x[bi, t, hi], B[bi, t, gi])
                y[bi, t, hi] = s @ C[bi, t, gi]
            state[bi, hi] = s
    return y, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("g", [1, 2])
def test_sequential_matches_numpy_loop(g, with_state):
    x, dt, A, B, C, s0 = make_inputs(1, l=11, g=g, with_state=with_state)
    want_y, want_s = numpy_ssd(x, dt, A, B, C, s0)
    y, s = jax.jit(ssd_sequential)(x, dt, A, B, C, initial_state=s0)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert np.max(np.abs(want_y)) > 0.5  # the check is not vacuous
    assert scaled_err(y, want_y) <= 1e-5
    assert scaled_err(s, want_s) <= 1e-5


def test_chunked_matches_numpy_loop():
    x, dt, A, B, C, s0 = make_inputs(2, l=13, g=2, with_state=True)
    want_y, want_s = numpy_ssd(x, dt, A, B, C, s0)
    y, s = jax.jit(functools.partial(ssd_chunked, chunk_size=4))(x, dt, A, B, C, initial_state=s0)
    assert scaled_err(y, want_y) <= 1e-5
    assert scaled_err(s, want_s) <= 1e-5


def test_group_mapping_matters():
    """Heads 0,1 use group 0 and heads 2,3 group 1 (not interleaved)."""
    x, dt, A, B, C, _ = make_inputs(3, b=1, l=5, g=2)
    y, _ = jax.jit(ssd_sequential)(x, dt, A, B, C)
    want, _ = numpy_ssd(x, dt, A, B, C)
    interleaved, _ = numpy_ssd(x, dt, A, B[:, :, ::-1], C[:, :, ::-1])
    assert scaled_err(y, want) <= 1e-5
    assert scaled_err(y, interleaved) > 1e-2


# --------------------------------------------------------------------------
# Chunked == sequential.
# --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _both_with_and_without_state(x, dt, A, B, C, s0, *, chunk_size):
    """One program (one compilation): {no initial state, s0} x {chunked, sequential}."""
    return _both(x, dt, A, B, C, None, chunk_size=chunk_size), _both(x, dt, A, B, C, s0, chunk_size=chunk_size)


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("l", [1, 8, 37, 64])
def test_chunked_matches_sequential(l, g):
    """chunk_size 8; with a zero (None) and a random initial state."""
    x, dt, A, B, C, s0 = make_inputs(10 + l, l=l, g=g, with_state=True)
    for (yc, sc), (ys, ss) in _both_with_and_without_state(x, dt, A, B, C, s0, chunk_size=8):
        assert yc.shape == (2, l, H, P) and sc.shape == (2, H, P, N)
        assert yc.dtype == jnp.float32 and sc.dtype == jnp.float32
        assert np.max(np.abs(ys)) > 0.1
        assert scaled_err(yc, ys) <= 1e-5
        assert scaled_err(sc, ss) <= 1e-5


def test_chunked_accepts_bfloat16_inputs():
    x, dt, A, B, C, s0 = make_inputs(4, l=12, g=2, with_state=True)
    bf = lambda v: jnp.asarray(v, jnp.bfloat16)
    (y, s), _ = _both(bf(x), dt, A, bf(B), bf(C), s0, chunk_size=8)
    # Reference on the same (rounded) values in float32.
    f = lambda v: np.asarray(bf(v), np.float32)
    want_y, want_s = numpy_ssd(f(x), dt, A, f(B), f(C), s0)
    assert y.dtype == jnp.float32 and s.dtype == jnp.float32
    assert scaled_err(y, want_y) <= 1e-5
    assert scaled_err(s, want_s) <= 1e-5


# --------------------------------------------------------------------------
# State hand-off (prefill -> decode).
# --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("k",))
def _split_run(x, dt, A, B, C, s0, *, k):
    run = functools.partial(ssd_chunked, chunk_size=8)
    whole = run(x, dt, A, B, C, initial_state=s0)
    y1, s1 = run(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], initial_state=s0)
    y2, s2 = run(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], initial_state=s1)
    y2_cold, _ = run(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], initial_state=None)
    return whole, (jnp.concatenate([y1, y2], axis=1), s2), y2_cold


@pytest.mark.parametrize("k", [13, 16])
def test_chunked_state_handoff(k):
    x, dt, A, B, C, s0 = make_inputs(5, l=37, g=2, with_state=True)
    (y_all, s_all), (y_split, s_split), y2_cold = _split_run(x, dt, A, B, C, s0, k=k)
    assert scaled_err(y_split, y_all) <= 1e-5
    assert scaled_err(s_split, s_all) <= 1e-5
    # The first part's state really is needed: starting from zeros differs.
    assert scaled_err(y2_cold, y_all[:, k:]) > 1e-3


@functools.partial(jax.jit, static_argnames=("k",))
def _prefill_then_steps(x, dt, A, B, C, *, k):
    whole = ssd_chunked(x, dt, A, B, C, chunk_size=8)
    y_pre, state = ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk_size=8)
    ys = [y_pre]
    for t in range(k, x.shape[1]):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y_t[:, None])
    return whole, (jnp.concatenate(ys, axis=1), state)


def test_prefill_then_step_decode():
    x, dt, A, B, C, _ = make_inputs(6, l=37, g=2)
    (y_all, s_all), (y_dec, s_dec) = _prefill_then_steps(x, dt, A, B, C, k=30)
    assert y_dec.shape == y_all.shape
    assert scaled_err(y_dec, y_all) <= 1e-5
    assert scaled_err(s_dec, s_all) <= 1e-5


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------
def test_chunked_gradients_match_sequential():
    x, dt, A, B, C, s0 = make_inputs(7, l=21, g=2, with_state=True)
    rng = np.random.default_rng(8)
    wy = rng.standard_normal(x.shape).astype(np.float32)
    ws = rng.standard_normal(s0.shape).astype(np.float32)

    def loss(fn, x, dt, A, B, C, s0):
        y, s = fn(x, dt, A, B, C, initial_state=s0)
        return jnp.sum(y * wy) + jnp.sum(s * ws)

    argnums = tuple(range(6))
    chunked = functools.partial(ssd_chunked, chunk_size=8)
    gc = jax.jit(jax.grad(functools.partial(loss, chunked), argnums))(x, dt, A, B, C, s0)
    gs = jax.jit(jax.grad(functools.partial(loss, ssd_sequential), argnums))(x, dt, A, B, C, s0)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "initial_state"), gc, gs):
        assert np.max(np.abs(b)) > 1e-2, name  # non-trivial gradient
        assert scaled_err(a, b) <= 1e-4, name


# --------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("impl,target", [("auto", "ssd_chunked"), ("chunked", "ssd_chunked"),
                                         ("sequential", "ssd_sequential")])
def test_dispatch_routes_by_name(monkeypatch, impl, target):
    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, kwargs))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ssd_module, "ssd_chunked", spy("ssd_chunked", ssd_chunked))
    monkeypatch.setattr(ssd_module, "ssd_sequential", spy("ssd_sequential", ssd_sequential))
    x, dt, A, B, C, s0 = make_inputs(9, b=1, l=6, g=2, with_state=True)
    y, s = jax.jit(functools.partial(ssd, chunk_size=4, impl=impl))(x, dt, A, B, C, initial_state=s0)
    assert [c[0] for c in calls] == [target]  # traced once
    assert calls[0][1]["initial_state"] is not None
    if target == "ssd_chunked":
        assert calls[0][1]["chunk_size"] == 4
    want_y, want_s = numpy_ssd(x, dt, A, B, C, s0)
    assert scaled_err(y, want_y) <= 1e-5
    assert scaled_err(s, want_s) <= 1e-5


@pytest.mark.parametrize("bad", ["triton", "Chunked", ""])
def test_dispatch_rejects_unknown_impl(bad):
    x, dt, A, B, C, _ = make_inputs(9, b=1, l=4, g=1)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        ssd(x, dt, A, B, C, chunk_size=4, impl=bad)


def _bad(name, args):
    x, dt, A, B, C, s0 = args
    bad = {
        "x": lambda: (x[0], dt, A, B, C, s0),
        "dt": lambda: (x, dt[:, :-1], A, B, C, s0),
        "A": lambda: (x, dt, A[:-1], B, C, s0),
        "B": lambda: (x, dt, A, B[:, :-1], C, s0),
        "C": lambda: (x, dt, A, B, C[..., :-1], s0),
        "initial_state": lambda: (x, dt, A, B, C, s0[..., :-1]),
        "groups": lambda: (x, dt, A, B[:, :, :1].repeat(3, 2), C[:, :, :1].repeat(3, 2), s0),
    }
    return bad[name]()


@pytest.mark.parametrize("impl", ["chunked", "sequential", "pallas"])
@pytest.mark.parametrize("name,match", [
    ("x", "SSD input x"), ("dt", "SSD input dt"), ("A", "SSD input A"), ("B", "SSD input B"),
    ("C", "SSD input C"), ("initial_state", "SSD input initial_state"), ("groups", "3 groups do not divide 4 heads"),
])
def test_bad_shapes_name_the_tensor(impl, name, match):
    x, dt, A, B, C, s0 = _bad(name, make_inputs(0, with_state=True))
    with pytest.raises(ValueError, match=match):
        ssd(x, dt, A, B, C, chunk_size=8, initial_state=s0, impl=impl)


def test_bad_chunk_size_is_named():
    x, dt, A, B, C, _ = make_inputs(0)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0, impl="chunked")
    y, _ = ssd(x, dt, A, B, C, chunk_size=np.int64(8), impl="chunked")  # numpy ints are fine
    assert y.shape == x.shape


# --------------------------------------------------------------------------
# Chunk groups (memory bound of long sequences): same values.
# --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("chunk_group",))
def _grouped_and_sequential(x, dt, A, B, C, s0, *, chunk_group):
    grouped = ssd_chunked(x, dt, A, B, C, chunk_size=8, initial_state=s0, chunk_group=chunk_group)
    return grouped, ssd_sequential(x, dt, A, B, C, initial_state=s0)


@pytest.mark.parametrize("chunk_group", [1, 2, 3])
@pytest.mark.parametrize("l", [37, 64, 101])
def test_chunk_groups_match_sequential(l, chunk_group):
    """Several groups of chunk_group chunks of 8, lengths not divisible by a group
    (nor by a chunk), with a random initial state."""
    x, dt, A, B, C, s0 = make_inputs(20 + l, l=l, g=2, with_state=True)
    (yg, sg), (ys, ss) = _grouped_and_sequential(x, dt, A, B, C, s0, chunk_group=chunk_group)
    assert yg.shape == ys.shape and sg.shape == ss.shape
    assert yg.dtype == jnp.float32 and sg.dtype == jnp.float32
    assert scaled_err(yg, ys) <= 1e-5
    assert scaled_err(sg, ss) <= 1e-5


def test_long_single_group_matches_sequential():
    """70 chunks in one group (chunk_group=0), the last one partial."""
    x, dt, A, B, C, s0 = make_inputs(33, b=1, l=557, g=2, with_state=True)
    (yg, sg), (ys, ss) = _grouped_and_sequential(x, dt, A, B, C, s0, chunk_group=0)
    assert scaled_err(yg, ys) <= 1e-5
    assert scaled_err(sg, ss) <= 1e-5


def test_chunk_groups_equal_one_group_and_bfloat16():
    x, dt, A, B, C, s0 = make_inputs(30, l=53, g=2, with_state=True)
    bf = lambda v: jnp.asarray(v, jnp.bfloat16)
    run = jax.jit(lambda g, *a: ssd_chunked(*a, chunk_size=8, initial_state=s0, chunk_group=g), static_argnums=0)
    for args in ((x, dt, A, B, C), (bf(x), dt, A, bf(B), bf(C))):
        (y1, s1), (y2, s2), (y0, s0_) = run(2, *args), run(None, *args), run(0, *args)
        assert scaled_err(y1, y2) <= 1e-5 and scaled_err(s1, s2) <= 1e-5
        np.testing.assert_array_equal(np.asarray(y0), np.asarray(y2))  # 0 and None: one group
        np.testing.assert_array_equal(np.asarray(s0_), np.asarray(s2))


def test_chunk_group_gradients_match_sequential():
    x, dt, A, B, C, s0 = make_inputs(31, l=37, g=2, with_state=True)
    rng = np.random.default_rng(32)
    wy = rng.standard_normal(x.shape).astype(np.float32)
    ws = rng.standard_normal(s0.shape).astype(np.float32)

    def loss(fn, *args):
        y, s = fn(*args[:5], initial_state=args[5])
        return jnp.sum(y * wy) + jnp.sum(s * ws)

    grouped = functools.partial(ssd_chunked, chunk_size=8, chunk_group=2)  # 3 groups, the last padded
    argnums = tuple(range(6))
    gg = jax.jit(jax.grad(functools.partial(loss, grouped), argnums))(x, dt, A, B, C, s0)
    gs = jax.jit(jax.grad(functools.partial(loss, ssd_sequential), argnums))(x, dt, A, B, C, s0)
    for name, a, b in zip(("x", "dt", "A", "B", "C", "initial_state"), gg, gs):
        assert np.max(np.abs(b)) > 1e-2, name
        assert scaled_err(a, b) <= 1e-4, name


def test_dispatch_passes_chunk_group(monkeypatch):
    seen = []
    real = ssd_module.ssd_chunked
    monkeypatch.setattr(ssd_module, "ssd_chunked", lambda *a, **k: seen.append(k["chunk_group"]) or real(*a, **k))
    x, dt, A, B, C, _ = make_inputs(9, b=1, l=20, g=2)
    y, _ = ssd(x, dt, A, B, C, chunk_size=4, impl="chunked", chunk_group=2)
    assert seen == [2]
    want, _ = numpy_ssd(x, dt, A, B, C)
    assert scaled_err(y, want) <= 1e-5
