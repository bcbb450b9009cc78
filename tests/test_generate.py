"""Prefill/decode consistency and `generate` on a tiny random Nemotron-H."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from hybridvlm.generate import _generate, sample_token
from hybridvlm.lm import NemotronHForCausalLM

VOCAB = 64
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax/_src/dispatch.py


@pytest.fixture(scope="module")
def model():
    return NemotronHForCausalLM(tiny_config(), rngs=nnx.Rngs(0))


def variant(model, **overrides):
    """The same weights under a config with `overrides` (no new random init)."""
    abstract = nnx.eval_shape(lambda: NemotronHForCausalLM(tiny_config(**overrides), rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


@functools.lru_cache(maxsize=None)
def _jitted(graphdef):
    """Jitted forward / prefill / decode for one model structure."""
    fwd = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, attention_mask=mask))
    prefill = jax.jit(lambda st, ids, mask, n: nnx.merge(graphdef, st).prefill(ids, mask, n),
                      static_argnums=3)
    decode = jax.jit(lambda st, tok, cache: nnx.merge(graphdef, st).decode(tok, cache))
    return fwd, prefill, decode


def jitted(model):
    graphdef, state = nnx.split(model)
    return (*_jitted(graphdef), state)


def prompts(seed, lengths, t):
    """Left-padded prompts of real tokens in [3, VOCAB) (pad 0, no bos/eos)."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(3, VOCAB, n)
        mask[i, t - n:] = True
    return ids, mask


def greedy_by_full_forward(model, ids, steps):
    """Greedy continuation by re-running the full forward on the whole sequence.

    To compile the forward once, the growing sequence sits at the start of a
    fixed buffer of t + steps - 1 slots and step i reads the logits at its last
    real token: later slots hold filler tokens, which a causal model cannot
    see (causality is checked by the prefill/decode tests). The last step has
    no filler at all: it is exactly argmax(model(seq)[:, -1]).
    """
    fwd, _, _, state = jitted(model)
    b, t = ids.shape
    buf = np.full((b, t + steps - 1), 5, np.int32)
    buf[:, :t] = ids
    out, margins = [], []
    for i in range(steps):
        last = np.asarray(fwd(state, buf, np.ones(buf.shape, bool))[:, t + i - 1])
        top2 = np.sort(last, axis=-1)[:, -2:]
        margins.append(np.min(top2[:, 1] - top2[:, 0]))
        tok = last.argmax(-1).astype(np.int32)
        out.append(tok)
        if i < steps - 1:
            buf[:, t + i] = tok
    return np.stack(out, axis=1), min(margins)


# --------------------------------------------------------------------------
# (a) prefill + decode == full forward.
# --------------------------------------------------------------------------
VARIANTS = {
    "default": {},  # no RoPE (Nemotron-H), naive attention and chunked SSD at these sizes
    "rope": dict(rope_theta=10_000.0),
    "blockwise_sequential": dict(attention_impl="blockwise", attention_block_q=4, attention_block_k=3,
                                 ssd_impl="sequential"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_decode_matches_full_forward(model, name):
    m = variant(model, **VARIANTS[name]) if VARIANTS[name] else model
    fwd, prefill, decode, state = jitted(m)
    t, extra = 6, 5  # prompt 6 (not a multiple of chunk_size 4), then 5 decode steps
    ids, mask = prompts(0, [6, 3], t)  # row 1 is left-padded
    rng = np.random.default_rng(1)
    new = rng.integers(3, VOCAB, (2, extra)).astype(np.int32)
    full_ids = np.concatenate([ids, new], axis=1)
    full_mask = np.concatenate([mask, np.ones((2, extra), bool)], axis=1)
    want = np.asarray(fwd(state, full_ids, full_mask))  # (2, t + extra, vocab)
    assert np.max(np.abs(want)) > 0.05  # logits are not all ~0
    if name == "blockwise_sequential":  # the implementation choice does not change the math
        fwd0, _, _, state0 = jitted(model)
        ref = np.asarray(fwd0(state0, full_ids, full_mask))
        np.testing.assert_allclose(want[full_mask], ref[full_mask], atol=1e-5, rtol=0)  # real tokens only

    last, cache = prefill(state, ids, mask, t + extra)
    assert last.shape == (2, VOCAB)
    np.testing.assert_allclose(last, want[:, t - 1], atol=1e-5, rtol=0)
    for i in range(extra):
        logits, cache = decode(state, new[:, i : i + 1], cache)
        assert logits.shape == (2, 1, VOCAB)
        np.testing.assert_allclose(logits[:, 0], want[:, t + i], atol=1e-5, rtol=0,
                                   err_msg=f"decode step {i}")
    assert int(cache.length) == t + extra
    assert np.asarray(cache.next_rope_pos).tolist() == [6 + extra, 3 + extra]


def test_decode_several_tokens_at_once(model):
    """decode() with t > 1 (chunked SSD from a state, causal attention in the cache)."""
    fwd, prefill, decode, state = jitted(model)
    ids, mask = prompts(2, [6, 2], 6)
    new = np.random.default_rng(3).integers(3, VOCAB, (2, 5)).astype(np.int32)
    want = np.asarray(fwd(state, np.concatenate([ids, new], 1),
                          np.concatenate([mask, np.ones((2, 5), bool)], 1)))
    _, cache = prefill(state, ids, mask, 11)
    logits, cache = decode(state, new, cache)
    assert logits.shape == (2, 5, VOCAB)
    np.testing.assert_allclose(logits, want[:, 6:], atol=1e-5, rtol=0)
    assert int(cache.length) == 11


# --------------------------------------------------------------------------
# (b) greedy generate == repeated full forwards.
# --------------------------------------------------------------------------
def test_greedy_generate_matches_full_forwards(model):
    ids, _ = prompts(4, [4, 4], 4)  # (2, 4): the forward buffer is (2, 11), as in the test above
    want, margin = greedy_by_full_forward(model, ids, 8)
    assert margin > 1e-4, "reference argmax is a near-tie; pick another seed"
    got = model.generate(jnp.asarray(ids), max_new_tokens=8, stop_tokens=())
    assert got.shape == (2, 8) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------
# (c) left padding in a batch == each prompt alone.
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch_case(model):
    """Two prompts (lengths 4 and 3), left-padded to 4, and their greedy outputs.

    The shapes (2, 4) and max_new_tokens=8 are shared with other tests, so
    that they reuse one compiled program.
    """
    ids, mask = prompts(6, [4, 3], 4)
    out = np.asarray(model.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8, stop_tokens=()))
    return ids, mask, out


def test_left_padded_batch_matches_single_prompts(model, batch_case):
    ids, mask, out = batch_case
    assert out.shape == (2, 8)
    for row in range(2):
        alone = ids[row : row + 1][:, mask[row]]  # the same prompt, unpadded
        single = np.asarray(model.generate(jnp.asarray(alone), max_new_tokens=8, stop_tokens=()))
        np.testing.assert_array_equal(out[row], single[0], err_msg=f"row {row}")
    # The two rows are genuinely different continuations.
    assert not np.array_equal(out[0], out[1])


# --------------------------------------------------------------------------
# (d) stop tokens.
# --------------------------------------------------------------------------
def test_stop_tokens_pad_the_rest(model, batch_case):
    ids, mask, ref = batch_case
    # Row 0 stops at step 3 (the token greedy emits there); row 1 on what it emits at step 5.
    stops = (int(ref[0, 3]), int(ref[1, 5]))
    first = [int(np.flatnonzero(np.isin(ref[r], stops))[0]) for r in range(2)]
    # Not vacuous: row 0 stops while row 1 still runs, and both stop before the end.
    assert first[0] <= 3 < first[1] <= 5, (ref, stops)
    # A pad id that greedy does not emit anyway, so padding is visible.
    pad = next(v for v in range(3, VOCAB) if v not in ref)
    got = np.asarray(model.generate(jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=8,
                                    stop_tokens=stops, pad_token_id=pad))
    for row in range(2):
        end = first[row] + 1  # the stop token itself is kept
        want = np.concatenate([ref[row, :end], np.full(8 - end, pad)])
        np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}")


def test_default_stop_and_pad_come_from_config(model, monkeypatch):
    """stop_tokens=None means config.eos_token_id; pad_token_id=None config.pad_token_id."""
    gen = importlib.import_module("hybridvlm.generate")  # the package re-exports a function of that name

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return jnp.zeros((1, kwargs["max_new_tokens"]), jnp.int32)

    monkeypatch.setattr(gen, "_generate", spy)
    m = variant(model, eos_token_id=(9, 11), pad_token_id=3)
    m.generate(np.full((1, 4), 7, np.int32), max_new_tokens=2)
    assert seen["stop_tokens"] == (9, 11) and seen["pad_token_id"] == 3 and seen["greedy"]
    m.generate(np.full((1, 4), 7, np.int32), max_new_tokens=2, stop_tokens=[5], pad_token_id=4,
               temperature=0.5)
    assert seen["stop_tokens"] == (5,) and seen["pad_token_id"] == 4 and not seen["greedy"]
    m.generate(np.full((1, 4), 7, np.int32), max_new_tokens=2, stop_tokens=())
    assert seen["stop_tokens"] == ()


# --------------------------------------------------------------------------
# (e) no recompilation.
# --------------------------------------------------------------------------
class CompileCounter:
    def __init__(self):
        self.names = []

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.names.append(kwargs.get("fun_name"))

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


def test_generate_does_not_recompile(model):
    ids_a, mask_a = prompts(6, [4, 2], 4)
    ids_b, mask_b = prompts(7, [3, 4], 4)
    args_a = jnp.asarray(ids_a), jnp.asarray(mask_a)
    args_b = jnp.asarray(ids_b), jnp.asarray(mask_b)
    # max_new_tokens=8 and stop_tokens=() as in batch_case: possibly compiled already.
    out_a = model.generate(*args_a, max_new_tokens=8, stop_tokens=()).block_until_ready()
    size = _generate._cache_size()
    with CompileCounter() as second:
        out_b = model.generate(*args_b, max_new_tokens=8, stop_tokens=()).block_until_ready()
    assert second.names == [], f"second call compiled {second.names}"
    assert _generate._cache_size() == size
    assert not np.array_equal(np.asarray(out_a), np.asarray(out_b))
    # The counter does see a compilation when a static argument changes.
    with CompileCounter() as third:
        model.generate(*args_b, max_new_tokens=5, stop_tokens=()).block_until_ready()
    assert any("_generate" in str(n) for n in third.names), third.names
    assert _generate._cache_size() == size + 1


# --------------------------------------------------------------------------
# (f) sampling.
# --------------------------------------------------------------------------
def test_sampling(model, batch_case):
    ids, mask, greedy = batch_case
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    sample = functools.partial(model.generate, ids, mask, max_new_tokens=8, stop_tokens=(),
                               temperature=0.8, top_p=0.9)
    keys = [jax.random.key(i) for i in range(4)]
    a1 = np.asarray(sample(rng=keys[1]))
    with CompileCounter() as counter:  # rng, temperature and top_p are traced, not static
        a2 = np.asarray(sample(rng=keys[1]))
        b = np.asarray(sample(rng=keys[2]))
        hot = np.asarray(sample(rng=keys[1], temperature=1.3))
        tiny = np.asarray(sample(top_p=1e-6, rng=keys[3]))
    assert counter.names == [], counter.names
    np.testing.assert_array_equal(a1, a2)
    assert not np.array_equal(a1, b)
    assert not np.array_equal(a1, greedy)
    for out in (a1, b):
        assert out.shape == (2, 8) and out.min() >= 0 and out.max() < VOCAB
    assert hot.shape == (2, 8)  # (the model's logits are nearly flat: T barely matters here)
    # A vanishing nucleus keeps only the most likely token: greedy.
    np.testing.assert_array_equal(tiny, greedy)


def test_sample_token_nucleus():
    """Independent of the model: which tokens top_p keeps, and temperature."""
    probs = np.array([0.05, 0.5, 0.3, 0.15], np.float32)
    logits = jnp.asarray(np.log(probs))[None]
    keys = jax.random.split(jax.random.key(0), 2000)

    @functools.partial(jax.jit, static_argnames=("greedy",))
    def draw(keys, temperature, top_p, greedy=False):
        pick = lambda k: sample_token(logits, k, greedy=greedy, temperature=temperature, top_p=top_p)[0]
        return jax.vmap(pick)(keys)

    # Mass strictly before token 2 is 0.5 < 0.6, before token 3 it is 0.8: keep {1, 2}.
    got = np.asarray(draw(keys, 1.0, 0.6))
    assert set(got.tolist()) == {1, 2}
    # Renormalised within the nucleus: P(1) = 0.5 / 0.8.
    assert abs(np.mean(got == 1) - 0.625) < 0.05
    # top_p = 1 keeps all; frequencies follow the probabilities.
    full = np.asarray(draw(keys, 1.0, 1.0))
    freq = np.bincount(full, minlength=4) / len(full)
    np.testing.assert_allclose(freq, probs, atol=0.04)
    # A low temperature concentrates on the argmax.
    cold = np.asarray(draw(keys, 0.05, 1.0))
    assert np.mean(cold == 1) > 0.99
    assert np.all(np.asarray(draw(keys[:3], 1.0, 1.0, greedy=True)) == 1)


# --------------------------------------------------------------------------
# (g) argument checks.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=4, attention_mask=np.ones((1, 4), bool)), "attention_mask"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=4, temperature=1.0, top_p=0.0), "top_p"),
    (dict(max_new_tokens=4, temperature=1.0, top_p=1.5), "top_p"),
])
def test_generate_rejects_bad_arguments(model, kwargs, match):
    ids = np.full((2, 5), 7, np.int32)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, **kwargs)


def test_generate_rejects_1d_input(model):
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(np.arange(3, 8, dtype=np.int32), max_new_tokens=2)


def test_prefill_rejects_small_cache(model):
    ids = np.full((1, 5), 7, np.int32)
    with pytest.raises(ValueError, match="cache_size"):
        model.prefill(ids, np.ones((1, 5), bool), 4)
