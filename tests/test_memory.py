"""Bounded memory of long prefills: sequence blocks and SSD chunk groups.

Values first (blocked == unblocked, the golden fixtures with tiny blocks),
then XLA's memory analysis of compiled programs (compile only, nothing is
allocated): the chunked SSD's temporaries are bounded by its chunk group, an
LM's do not grow with its depth, and `eval.bench_memory` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

import hybridvlm
from configs.nemotron_h_12b import PATTERN
from hybridvlm import LMConfig, NemotronHForCausalLM
from hybridvlm.cache import Layout
from hybridvlm.layers.mamba2 import Mamba2Mixer
from hybridvlm.layers.mlp import MLP
from hybridvlm.ops.blocks import block_plan, map_blocks
from hybridvlm.ssd import ssd_chunked

MiB = 2**20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# map_blocks.
# --------------------------------------------------------------------------
@pytest.mark.parametrize("length,block,align,want", [
    (10, None, 1, (1, 10)), (10, 0, 1, (1, 10)), (10, 10, 1, (1, 10)),
    (11, 10, 1, (2, 6)),       # balanced: 6 + 5 (one padded position), not 10 + 1
    (33, 8, 4, (5, 8)), (257, 64, 8, (5, 56)), (10, 8, 16, (1, 10)),
])
def test_block_plan(length, block, align, want):
    n, size = block_plan(length, block, align)
    assert (n, size) == want
    assert n * size >= length and size % align == 0 or n == 1


def test_map_blocks_carries_state_and_skips_padding():
    """A running sum (the carry) over 23 positions in blocks of 5 (the last one
    padded): equal to the unblocked cumulative sum, padding kept out of the carry
    with a mask extra."""
    x = jnp.arange(2 * 23, dtype=jnp.float32).reshape(2, 23) % 7

    def running_sum(total, xb, real):
        cum = total[:, None] + jnp.cumsum(xb, axis=1)
        return total + jnp.sum(jnp.where(real, xb, 0), axis=1), cum.astype(jnp.int32)

    y, total = jax.jit(lambda x: map_blocks(running_sum, x, jnp.ones(x.shape, bool), block=5,
                                            carry=jnp.zeros(2)))(x)
    assert y.shape == x.shape and y.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(y), np.cumsum(np.asarray(x), axis=1).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(total), np.asarray(x).sum(axis=1))


def test_map_blocks_refuses_a_shape_change():
    with pytest.raises(ValueError, match="keep the block's shape"):
        map_blocks(lambda c, xb: (c, xb[:, :1]), jnp.zeros((1, 9)), block=4)


# --------------------------------------------------------------------------
# Blocked layers and model == unblocked.
# --------------------------------------------------------------------------
def _left_padded(b=2, t=29, d=32, pad=(0, 6), seed=0):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, d)), jnp.float32)
    mask = jnp.asarray(np.arange(t)[None] >= np.asarray(pad)[:, None])
    return x, Layout.prompt(mask)


@pytest.mark.parametrize("use_bias", [False, True])
def test_mamba_blocks_match_unblocked(use_bias):
    """29 tokens in blocks of 8 (chunk 4): outputs, conv and SSM states, a decode step after."""
    cfg = tiny_config(pattern="M", use_bias=use_bias)
    whole, blocked = (Mamba2Mixer(c, rngs=nnx.Rngs(0)) for c in (cfg, cfg.replace(seq_block=8, ssd_chunk_group=1)))
    x, layout = _left_padded()
    assert block_plan(29, 8, 4)[0] == 4

    @jax.jit
    def run(sa, sb, x, layout):
        a, b = nnx.merge(nnx.graphdef(whole), sa), nnx.merge(nnx.graphdef(blocked), sb)
        out = []
        for m in (a, b):
            y, st = m(x, layout, m.zero_state(2, jnp.float32))
            y_nostate, _ = m(x, layout)
            step = Layout(index=jnp.full((2, 1), 29), valid=jnp.ones((2, 1), bool), rope_pos=jnp.zeros((2, 1), jnp.int32))
            y1, st1 = m(x[:, :1], step, st)
            out.append((y, y_nostate, st, y1, st1))
        return out

    (ya, yna, sa, y1a, s1a), (yb, ynb, sb, y1b, s1b) = run(nnx.state(whole), nnx.state(blocked), x, layout)
    valid = np.asarray(layout.valid)
    for got, want in ((yb, ya), (ynb, yna), (y1b, y1a)):
        g, w = np.asarray(got), np.asarray(want)
        rows = valid if g.shape[1] == valid.shape[1] else np.ones(g.shape[:2], bool)
        assert np.max(np.abs(g[rows] - w[rows])) <= 1e-5
    for got, want in ((sb.conv, sa.conv), (sb.ssm, sa.ssm), (s1b.ssm, s1a.ssm)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_mlp_blocks_match_unblocked():
    whole = MLP(32, 64, bias=True, rngs=nnx.Rngs(0))
    blocked = MLP(32, 64, bias=True, rngs=nnx.Rngs(0), seq_block=8)
    x, _ = _left_padded()
    np.testing.assert_allclose(np.asarray(jax.jit(blocked)(x)), np.asarray(jax.jit(whole)(x)), atol=1e-6, rtol=0)


def test_golden_fixture_with_tiny_blocks():
    """The HF reference's logits and prefill states (tests/fixtures) with every
    layer in blocks of 8 tokens and SSD groups of one chunk: 21 left-padded
    tokens in 3 blocks, the last one padded. (Decoding after a blocked prefill:
    test_mamba_blocks_match_unblocked.)"""
    case = os.path.join(ROOT, "tests", "fixtures", "nemotron_h", "hybrid_g2")
    e = dict(np.load(os.path.join(case, "expected.npz")))
    model = hybridvlm.from_pretrained(case, seq_block=8, ssd_chunk_group=1, ssd_impl="chunked")
    ids, mask = jnp.asarray(e["input_ids"]), jnp.asarray(e["attention_mask"])
    logits = nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask)
    valid = e["attention_mask"].astype(bool)
    assert np.abs(np.asarray(logits) - e["logits"])[valid].max() <= 1e-4
    _, cache = nnx.jit(lambda m, i, a: m.prefill(i, a, i.shape[1] + 1))(model, ids, mask)
    np.testing.assert_allclose(np.asarray(cache.layers[0].ssm), e["ssm_final_state_layer0"], atol=1e-4, rtol=0)
    want_conv = np.swapaxes(e["conv_state_layer0"], 1, 2)[:, 1:]  # reference: channels first, k columns
    np.testing.assert_allclose(np.asarray(cache.layers[0].conv), want_conv, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------
# Compiled temporaries (XLA's memory analysis; compile only).
# --------------------------------------------------------------------------
def _ssd_temp_mib(length, chunk_group, *, h=16, p=32, n=32, g=2, chunk=64):
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    args = (spec(1, length, h, p), spec(1, length, h), spec(h), spec(1, length, g, n), spec(1, length, g, n))
    fn = lambda *a: ssd_chunked(*a, chunk_size=chunk, chunk_group=chunk_group)
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes / MiB


def test_ssd_temporaries_are_bounded_by_the_chunk_group():
    """4x the length: near-constant temporaries in groups of 4 chunks, ~4x in one group."""
    grouped = [_ssd_temp_mib(n, 4) for n in (2048, 8192)]
    one_group = [_ssd_temp_mib(n, 0) for n in (2048, 8192)]
    assert grouped[1] <= 1.5 * grouped[0], grouped
    assert one_group[1] >= 3 * one_group[0], one_group  # the check can fail
    assert grouped[1] <= one_group[1] / 10, (grouped, one_group)


def _lm_temp_mib(layers, t=8192, **overrides):
    """Temporaries of a bf16 prefill of t tokens by the 12B pattern's first layers, at a small width."""
    cfg = LMConfig(vocab_size=1024, hidden_size=256, pattern=PATTERN[:layers], num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, intermediate_size=1024, mamba_num_heads=8, mamba_head_dim=64,
                   ssm_state_size=32, n_groups=2, chunk_size=64, **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    prefill = lambda state, ids, mask: nnx.merge(graphdef, state).prefill(ids, mask, t)
    spec = lambda dtype: jax.ShapeDtypeStruct((1, t), dtype)
    compiled = jax.jit(prefill).lower(state, spec(jnp.int32), spec(jnp.bool_)).compile()
    return compiled.memory_analysis().temp_size_in_bytes / MiB


def test_lm_temporaries_do_not_grow_with_depth():
    """10 vs 20 layers (Mamba, MLP and attention) of an 8k-token prefill in blocks of
    1024 tokens: the same temporaries; unblocked, 20 layers need several times more."""
    ten, twenty = _lm_temp_mib(10, seq_block=1024, ssd_chunk_group=4), _lm_temp_mib(20, seq_block=1024, ssd_chunk_group=4)
    assert twenty <= 1.1 * ten, (ten, twenty)
    unblocked = _lm_temp_mib(20, seq_block=0, ssd_chunk_group=0)
    assert unblocked >= 2 * twenty, (twenty, unblocked)


def test_bench_memory_cli(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run([sys.executable, "-m", "eval.bench_memory", "--runlocal", "--layers", "2", "--frames", "4",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU compiler's" in proc.stdout or jax.default_backend() != "cpu"
    rows = json.loads(out.read_text())["rows"]
    assert [r["plan"] for r in rows] == ["full", "progressive-step"]
    for r in rows:
        assert r["tokens"] == 4 * 64 + 16 and r["fits_80gb"]
        assert r["temp_gib"] > 0 and r["params_gib"] > 0
        assert abs(r["total_gib"] - r["params_gib"] - r["temp_gib"] - r["output_gib"]) < 1e-9
    bad = subprocess.run([sys.executable, "-m", "eval.bench_memory", "--frames", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--frames" in bad.stderr


@pytest.mark.parametrize("field", ["seq_block", "ssd_chunk_group"])
def test_memory_fields_are_validated(field):
    with pytest.raises(hybridvlm.config.ConfigError, match=f"LMConfig.{field}: must be >= 0"):
        tiny_config(**{field: -1})
    assert getattr(tiny_config(**{field: 0}), field) == 0  # 0: no blocks / one group
