"""Library attention kernels for prompts (hybridvlm/ops/attention_library.py) against the naive path.

The splash kernel runs in Pallas interpret mode on CPU; the cuDNN path is checked
through `jax.nn.dot_product_attention(implementation="xla")`, which takes the same
arguments (the valid-first permutation and the sequence lengths are what can be wrong).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridvlm import NemotronHForCausalLM
from hybridvlm.ops.attention import attention_naive
from hybridvlm.ops.attention_library import attention_cudnn, attention_splash, prompt_attention, splash_block
from reduction.plan import ReductionPlan

KERNELS = {
    "cudnn": lambda q, k, v, valid, scale: attention_cudnn(q, k, v, valid=valid, scale=scale, implementation="xla"),
    "splash": lambda q, k, v, valid, scale: attention_splash(q, k, v, valid=valid, scale=scale),
}


def _inputs(t=150, b=2, n=4, kv=2, d=16, seed=0):
    """Row 0 left-padded; row 1 with holes (padded visual slots) mid-sequence."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, n, d))
    k = jax.random.normal(ks[1], (b, t, kv, d))
    v = jax.random.normal(ks[2], (b, t, kv, d))
    valid = np.ones((b, t), bool)
    valid[0, :11] = False
    valid[1, 40:57] = False
    valid[1, 90] = False
    return q, k, v, jnp.asarray(valid)


def _naive(q, k, v, valid, scale):
    idx = jnp.broadcast_to(jnp.arange(q.shape[1]), valid.shape)
    out = attention_naive(q, k, v, q_pos=idx, k_pos=idx, k_valid=valid, scale=scale)
    return jnp.where(valid[:, :, None, None], out, 0.0)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_forward_matches_naive_with_padding_and_holes(name):
    q, k, v, valid = _inputs()
    scale = 0.3
    got = jax.jit(KERNELS[name], static_argnums=4)(q, k, v, valid, scale)
    want = _naive(q, k, v, valid, scale)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
    # Rows of padding are exactly 0.
    assert not np.asarray(got)[~np.asarray(valid)].any()


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_gradients_match_naive(name):
    q, k, v, valid = _inputs(t=130, seed=1)
    weight = jnp.sin(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, valid, 0.25) * weight)

    got = jax.jit(jax.grad(loss(KERNELS[name]), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(_naive), argnums=(0, 1, 2))(q, k, v)
    for g, w, what in zip(got, want, "qkv"):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=5e-5, rtol=0, err_msg=f"d{what}")
    # No gradient reaches the keys and values of padding.
    assert not np.asarray(got[1])[~np.asarray(valid)].any()


def test_splash_blocks_are_whole_and_aligned():
    assert splash_block(1) == (128, 128)
    assert splash_block(130) == (256, 256)
    assert splash_block(600) == (1024, 512)
    assert splash_block(1024) == (1024, 512)


def test_cudnn_needs_a_gpu_and_half_precision():
    q, k, v, valid = _inputs(t=100)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
            prompt_attention(q, k, v, valid=valid, scale=1.0, impl="cudnn")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        attention_cudnn(q, k, v, valid=valid, scale=1.0)


def test_lm_with_splash_equals_naive_under_a_plan_and_in_decoding():
    """A hybrid LM with attention_impl="splash": the pruned prefill's logits and the
    greedy tokens after it equal the naive path's (decoding falls back to the XLA path)."""
    from conftest import tiny_config

    pattern, vis = "M*-M*-", 20
    models = {impl: NemotronHForCausalLM(tiny_config(pattern=pattern, chunk_size=8, attention_impl=impl),
                                         rngs=nnx.Rngs(0)) for impl in ("naive", "splash")}
    rng = np.random.default_rng(3)
    b, t = 2, 4 + vis + 6
    ids = rng.integers(3, 64, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), bool)
    mask[1, :3] = False
    visual = np.zeros((b, t), bool)
    visual[:, 4:4 + vis] = True
    mask[1, 4 + vis - 5:4 + vis] = False  # row 1's last 5 visual slots are padding (a shorter video)
    ids, mask, visual = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(visual)
    plan = ReductionPlan(num_layers=len(pattern), num_visual=vis, stages=((1, 12), (4, 6)))

    def forward(m):
        return nnx.jit(lambda m, i, a, v: m(i, attention_mask=a, visual_mask=v, reduction=plan))(m, ids, mask, visual)

    got, want = np.asarray(forward(models["splash"])), np.asarray(forward(models["naive"]))
    last = np.s_[:, -1]  # every row's last position is its question's last token
    np.testing.assert_allclose(got[last], want[last], atol=1e-4, rtol=0)

    def generate(m):
        return np.asarray(m.generate(ids, attention_mask=mask, visual_mask=visual, reduction=plan,
                                     max_new_tokens=2))

    np.testing.assert_array_equal(generate(models["splash"]), generate(models["naive"]))
