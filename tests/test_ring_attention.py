"""Ring attention (`hybridvlm.context.ring_attention`) equals `attention_naive` on the gathered sequence.

The multi-device cases run in one subprocess with 8 fake CPU devices (the
test process has already fixed its device count); each test reads its case's
errors from that run's JSON.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from hybridvlm.context.ring_attention import ring_attention
from hybridvlm.ops.attention import attention_naive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, PartitionSpec as P
from hybridvlm.context.ring_attention import ring_attention
from hybridvlm.ops.attention import attention_naive

B, D, SCALE = 3, 8, 0.35


def inputs(n, kv, dtype, pruned, seed, T):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, n, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, kv, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, kv, D), jnp.float32).astype(dtype)
    if pruned:
        # Kept tokens keep their original positions: increasing, with gaps.
        gaps = np.random.default_rng(seed).integers(1, 5, (B, T))
        pos = np.cumsum(gaps, axis=1).astype(np.int32) + 7
    else:
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    valid = np.ones((B, T), bool)
    valid[1, :13] = False   # left padding spanning all of shard 0 (8 tokens) of the 8-way split
    valid[2] = False        # a row of padding only
    if pruned:
        valid[0, [20, 21, 40]] = False  # holes in the middle of a row
    cot = jax.random.normal(ks[3], (B, T, n, D), jnp.float32)
    return q, k, v, jnp.asarray(pos), jnp.asarray(valid), cot


def case(shape, names, n, kv, dtype, pruned=False, check_vma=True, seed=0, T=64, **blocks):
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    size = dict(zip(names, shape))["sequence"]
    heads = "tensor" if "tensor" in names else None
    x_spec, p_spec = P(None, "sequence", heads, None), P(None, "sequence")
    ring = jax.shard_map(
        lambda q, k, v, qp, kp, kval: ring_attention(q, k, v, q_pos=qp, k_pos=kp, k_valid=kval, scale=SCALE,
                                                     axis_name="sequence", axis_size=size, **blocks),
        mesh=mesh, in_specs=(x_spec, x_spec, x_spec, p_spec, p_spec, p_spec), out_specs=x_spec, check_vma=check_vma)
    q, k, v, pos, valid, cot = inputs(n, kv, dtype, pruned, seed, T)
    seen = np.asarray((valid[:, None, :] & (pos[:, None, :] <= pos[:, :, None])).any(-1))  # (b, t)
    cot = cot * seen[..., None, None]  # the loss reads rows that see a key only

    def naive(q, k, v):  # the reference, in float32 on the same (rounded) inputs
        f = lambda x: x.astype(jnp.float32)
        return attention_naive(f(q), f(k), f(v), q_pos=pos, k_pos=pos, k_valid=valid, scale=SCALE)

    ring_ = lambda q, k, v: ring(q, k, v, pos, pos, valid)
    f32 = dtype == jnp.float32

    def with_grads(fn):  # output and, in float32, the gradients of sum(out * cot): one compile
        def run(q, k, v):
            out, vjp = jax.vjp(fn, q, k, v)
            return out, (vjp(cot.astype(out.dtype)) if f32 else None)
        return jax.jit(run)

    got, g = with_grads(ring_)(q, k, v)
    ref, g_ref = with_grads(naive)(q, k, v)
    got, ref = np.asarray(got, np.float32), np.asarray(ref)
    r = dict(
        fwd=float(np.abs(got - ref)[seen].max() / np.abs(ref[seen]).max()),
        unseen=float(np.abs(got[~seen]).max()),
        finite=bool(np.isfinite(got).all()),
        n_unseen=int((~seen).sum()),
    )
    if f32:
        r["grad"] = [float(np.abs(np.asarray(a) - np.asarray(c)).max() / np.abs(np.asarray(c)).max())
                     for a, c in zip(g, g_ref)]
        r["grad_finite"] = all(bool(np.isfinite(np.asarray(a)).all()) for a in g)
    return r


cases = dict(
    causal_f32=case((8,), ("sequence",), 4, 2, jnp.float32),
    causal_f32_no_check_vma=case((8,), ("sequence",), 4, 2, jnp.float32, check_vma=False),
    multi_query_f32=case((8,), ("sequence",), 4, 1, jnp.float32, seed=1),
    pruned_positions_f32=case((8,), ("sequence",), 4, 2, jnp.float32, pruned=True, seed=2),
    sequence4_tensor2_f32=case((4, 2), ("sequence", "tensor"), 4, 2, jnp.float32, seed=3),
    causal_bf16=case((8,), ("sequence",), 4, 2, jnp.bfloat16, seed=4),
    pruned_positions_bf16=case((8,), ("sequence",), 4, 2, jnp.bfloat16, pruned=True, seed=5),
    # Local t = s = 24 in query blocks of 16 and key blocks of 8 (neither
    # divides the other or 24: dummy query rows, several tiles per step).
    blocked_pruned_f32=case((8,), ("sequence",), 4, 2, jnp.float32, pruned=True, seed=6, T=192, block_q=16, block_k=8),
)
print("RESULT " + json.dumps(cases))
"""

CASES = ["causal_f32", "causal_f32_no_check_vma", "multi_query_f32", "pruned_positions_f32", "sequence4_tensor2_f32",
         "causal_bf16", "pruned_positions_bf16",
         "blocked_pruned_f32"]


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", CASES)
def test_ring_attention_equals_naive_on_the_gathered_sequence(sharded, name):
    r = sharded[name]
    tol = 1e-2 if "bf16" in name else 1e-5
    assert r["fwd"] <= tol, r
    # Rows that see no key (left padding, the all-padding row) are exactly 0, nowhere NaN.
    assert r["n_unseen"] > 64 and r["unseen"] == 0.0 and r["finite"], r
    if "grad" in r:
        assert max(r["grad"]) <= 1e-5 and r["grad_finite"], r


@pytest.mark.parametrize("blocks", [{}, dict(block_q=5, block_k=3), dict(block_q=0, block_k=None)])
def test_one_device_axis_needs_no_hop(blocks):
    # P = 1: only the own block is folded; positions with gaps, some keys invalid.
    # Default (one tile), tiles dividing neither t = 12 nor each other, and 0 / None (no blocking).
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    b, t, n, kv, d = 2, 12, 4, 2, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(ks[0], (b, t, n, d)), jax.random.normal(ks[1], (b, t, kv, d)),
               jax.random.normal(ks[2], (b, t, kv, d)))
    pos = jnp.asarray(np.cumsum(np.random.default_rng(0).integers(1, 4, (b, t)), axis=1), jnp.int32)
    valid = jnp.ones((b, t), bool).at[1, :5].set(False)
    spec = P(None, "sequence")
    ring = jax.shard_map(lambda *a: ring_attention(*a[:3], q_pos=a[3], k_pos=a[4], k_valid=a[5], scale=0.3,
                                                   axis_name="sequence", axis_size=1, **blocks),
                         mesh=mesh, in_specs=(spec,) * 6, out_specs=spec)
    got = np.asarray(ring(q, k, v, pos, pos, valid))
    ref = np.asarray(attention_naive(q, k, v, q_pos=pos, k_pos=pos, k_valid=valid, scale=0.3))
    seen = np.asarray(valid)  # positions increase, so a valid query sees itself; left padding sees nothing
    np.testing.assert_allclose(got[seen], ref[seen], rtol=1e-5, atol=1e-6)
    assert (got[~seen] == 0).all()


def test_heads_must_group():
    q, k = jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 2, 8))
    pos = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="kv heads must divide"):
        ring_attention(q, k, k, q_pos=pos, k_pos=pos, k_valid=pos > 0, scale=1.0, axis_name="sequence", axis_size=1)


def test_blocked_memory_is_far_below_the_full_score_tensor():
    # Local t = s = 4096 in 256 x 256 tiles: the compiled forward's and
    # gradient's temporaries stay far below the (b, n, t, s) float32 scores
    # (128 MiB here; unblocked, the forward needs about 3x that).
    b, t, n, kv, d, blk = 1, 4096, 2, 1, 8, 256
    mesh = jax.make_mesh((1,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    spec = P(None, "sequence")
    ring = jax.shard_map(lambda q, k, v, pos, val: ring_attention(q, k, v, q_pos=pos, k_pos=pos, k_valid=val,
                                                                  scale=0.3, axis_name="sequence", axis_size=1,
                                                                  block_q=blk, block_k=blk),
                         mesh=mesh, in_specs=(spec,) * 5, out_specs=spec)
    x, kx = jax.ShapeDtypeStruct((b, t, n, d), jnp.float32), jax.ShapeDtypeStruct((b, t, kv, d), jnp.float32)
    pos, val = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), bool)
    full = b * n * t * t * 4
    grad = jax.grad(lambda *a: ring(*a).sum(), argnums=(0, 1, 2))
    for fn in (ring, grad):
        temp = jax.jit(fn).lower(x, kx, kx, pos, val).compile().memory_analysis().temp_size_in_bytes
        assert temp < full / 8, (fn, temp, full)
