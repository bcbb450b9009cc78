"""Context parallelism (`hybridvlm.context`): the sequence-split prompt pass equals one device.

The multi-device checks run in a subprocess with 8 fake CPU devices (the test
process has already fixed its device count).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hybridvlm.cache import Layout
from hybridvlm.config import LMConfig
from hybridvlm.context.mamba import incoming_state
from hybridvlm.context.reduce import check_stage_split
from hybridvlm.context.prefill import context_parallel_hidden, context_parallel_prefill, shard_plan
from hybridvlm.lm import NemotronHForCausalLM
from reduction import plan as rplan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=64, hidden_size=32, pattern="M*-M*-", num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4,
            chunk_size=8)

SCRIPT = r"""
import dataclasses, json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import AxisType
from hybridvlm.cache import KVCache, Layout
from hybridvlm.config import LMConfig
from hybridvlm.context.prefill import (context_parallel_hidden, context_parallel_prefill,
                                       context_parallel_vlm_prefill, shard_plan)
from hybridvlm.lm import NemotronHForCausalLM
from hybridvlm.sharding import shard_model
from reduction import plan as rplan
from reduction.scores import ScoreConfig

cfg = LMConfig(**json.loads(sys.argv[1]))
lm = NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0))
b, t = 2, 64
ids = jax.random.randint(jax.random.key(1), (b, t), 3, cfg.vocab_size)
# Row 1 is left-padded past the whole first shard of the 8-way split (8 tokens).
mask = jnp.ones((b, t), bool).at[1, :13].set(False)
visual = jnp.zeros((b, t), bool).at[:, 16:56].set(True)  # 40 visual slots, 8 text tokens after them
h0 = lm.embed_tokens(ids)
cot = jax.random.normal(jax.random.key(2), (b, t, cfg.hidden_size))
MESHES = {"sequence8": ((8,), ("sequence",)), "sequence4xtensor2": ((4, 2), ("sequence", "tensor")),
          "sequence2": ((2,), ("sequence",))}
# The paper's progressive plan (Mamba and attention scoring layers, decayed Mamba scores)
# and FastV, rounded so that every stage drops a multiple of 8 tokens.
PLANS = {"none": None,
         "step": shard_plan(rplan.named("step", cfg.num_layers, 40, 0.4, scorer=ScoreConfig(mamba_mode="decay")), 8),
         "fastv": shard_plan(rplan.named("fastv", cfg.num_layers, 40, 0.45), 8)}
err = lambda a, c: float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(c, np.float32))))
rel = lambda a, c: err(a, c) / max(float(np.max(np.abs(np.asarray(a, np.float32)))), 1e-30)

def cache_err(ref, got):
    # Keys and values of padding slots differ (a query that sees no key gives 0 here, the
    # naive path's mean of all values there) and are never read: compare valid slots only.
    worst = err(ref.length, got.length) + err(ref.next_rope_pos, got.next_rope_pos)
    for a, c in zip(ref.layers, got.layers):
        if isinstance(a, KVCache):
            v = np.asarray(a.valid)
            worst = max(worst, float(a.k.shape != c.k.shape), err(a.valid, c.valid), err(a.length, c.length),
                        err(np.asarray(a.k)[v], np.asarray(c.k)[v]), err(np.asarray(a.v)[v], np.asarray(c.v)[v]))
        elif a is not None:
            worst = max(worst, err(a.conv, c.conv), err(a.ssm, c.ssm))
    return worst

def greedy(model, logits, cache, n=3):
    toks = []
    decode = jax.jit(lambda tok, cache: model.decode(tok, cache))
    for _ in range(n):
        tok = jnp.argmax(logits, axis=-1)[:, None]
        toks.append(np.asarray(tok)[:, 0].tolist())
        logits, cache = decode(tok, cache)
        logits = logits[:, -1]
    return toks, logits

def hidden_loss(run):
    def loss(params, h):
        hh, index = run(params, h)
        # Padding rows' hidden states differ (see cache_err) and are never read: valid tokens only.
        w = jnp.take_along_axis(cot * mask[..., None], index[..., None], axis=1)
        return jnp.sum(hh * w)
    return loss

base = lm
results = {}
for mesh_name, plan_name, grads, prefill, seq_block in json.loads(sys.argv[2]):
    # seq_block > 0: the same weights with layers run in blocks of that many tokens (a
    # shard's Mamba layers then take their two-pass blocked path).
    lm = base if not seq_block else NemotronHForCausalLM(dataclasses.replace(cfg, seq_block=seq_block),
                                                         rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(lm, nnx.Param, ...)
    shape, names = MESHES[mesh_name]
    plan = PLANS[plan_name]
    vis = None if plan is None else visual
    mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))
    lm_m = shard_model(lm, mesh) if "tensor" in names else lm
    graph_m, params_m, rest_m = nnx.split(lm_m, nnx.Param, ...)
    one = lambda p, h: (lambda o: (o[0], o[2].index))(nnx.merge(graphdef, p, rest).run_layers_with_layout(
        h, Layout.prompt(mask), reduction=plan, visual=vis))
    cp = lambda p, h: context_parallel_hidden(nnx.merge(graph_m, p, rest_m), h, mask, mesh=mesh, reduction=plan,
                                              visual_mask=vis)
    ref_h, ref_index = jax.jit(one)(params, h0)
    got_h, got_index = jax.jit(cp)(params_m, h0)
    valid = np.take_along_axis(np.asarray(mask), np.asarray(ref_index), axis=1)
    out = dict(kept_same=bool(np.array_equal(np.asarray(ref_index), np.asarray(got_index))),
               hidden=rel(np.asarray(ref_h)[valid], np.asarray(got_h)[valid]))
    if grads:
        ref_gp, ref_gh = jax.jit(jax.grad(hidden_loss(one), argnums=(0, 1)))(params, h0)
        got_gp, got_gh = jax.jit(jax.grad(hidden_loss(cp), argnums=(0, 1)))(params_m, h0)
        m = np.asarray(mask)
        out["grad_h"] = rel(np.asarray(ref_gh)[m], np.asarray(got_gh)[m])
        out["grad_params"] = max(rel(a, c) for a, c in zip(jax.tree_util.tree_leaves(ref_gp),
                                                           jax.tree_util.tree_leaves(got_gp)))
    if prefill:
        ref_logits, ref_cache = jax.jit(lambda i, mk: lm.prefill(i, mk, t + 4, reduction=plan, visual_mask=vis))(
            ids, mask)
        got_logits, got_cache = jax.jit(lambda i, mk: context_parallel_prefill(
            lm_m, i, mk, t + 4, mesh=mesh, reduction=plan, visual_mask=vis))(ids, mask)
        ref_toks, ref_last = greedy(lm, ref_logits, ref_cache)
        got_toks, got_last = greedy(lm, got_logits, got_cache)
        out.update(logits=err(ref_logits, got_logits), cache=cache_err(ref_cache, got_cache),
                   same_tokens=ref_toks == got_toks, decode=err(ref_last, got_last))
    results[f"{mesh_name}/{plan_name}" + (f"/seq_block{seq_block}" if seq_block else "")] = out

lm = base
if len(sys.argv) > 3:  # the VLM: tower and projector first, then the LM split along the sequence
    from configs import tiny_vlm
    from eval.inputs import tiny_vlm_config
    from hybridvlm.batch import pad_video_batch
    from eval.bench_data import random_model
    c = tiny_vlm.get_config()
    c.model.update(pattern="M*-M*-", hidden_size=32, intermediate_size=64, mamba_num_heads=4, head_dim=8,
                   chunk_size=16)
    c.vision.update(num_layers=1, hidden_size=32, num_heads=2, max_img_size=64)
    c.image_size, c.projector_hidden_size = 64, 64
    vcfg = tiny_vlm_config(c)
    vlm = random_model(vcfg, seed=0)
    per = vcfg.tokens_per_tubelet(64, 64)
    rng = np.random.default_rng(0)
    rows = []
    for r in range(2):
        text = rng.integers(40, 120, size=12)
        rows.append((np.concatenate([[1], text[:4], np.full(4 * per, vcfg.image_token_id), text[4:]]),
                     rng.normal(size=(4, 6, 64, 64)).astype(np.float32)))
    vids, vmask, pix = pad_video_batch(rows, bucket=4, tokens_per_tubelet=per, image_token_id=vcfg.image_token_id,
                                       pad_token_id=0, length=48)
    vplan = shard_plan(rplan.named("step", vcfg.text.num_layers, 4 * per, 0.5), 8)
    mesh = jax.make_mesh((8,), ("sequence",), axis_types=(AxisType.Auto,))
    ref_logits, ref_cache = jax.jit(lambda i, mk, px: vlm.prefill(i, mk, 52, pixel_values_videos=px,
                                                                 reduction=vplan))(vids, vmask, pix)
    got_logits, got_cache = jax.jit(lambda i, mk, px: context_parallel_vlm_prefill(
        vlm, i, mk, 52, mesh=mesh, pixel_values_videos=px, reduction=vplan))(vids, vmask, pix)
    ref_toks, _ = greedy(vlm, ref_logits, ref_cache)
    got_toks, _ = greedy(vlm, got_logits, got_cache)
    results["vlm"] = dict(logits=err(ref_logits, got_logits), cache=cache_err(ref_cache, got_cache),
                          same_tokens=ref_toks == got_toks)
print("RESULT " + json.dumps(results))
"""

# (mesh, plan, check gradients, check prefill + decode, seq_block or 0); kept small: each is a
# few compiles. With seq_block 16, a 2-way split's 32-token shards run their Mamba layers in
# blocks (before the plan's first stage; the one-device side is blocked too).
CASES = [("sequence8", "none", False, True, 0), ("sequence8", "step", True, True, 0),
         ("sequence4xtensor2", "none", True, True, 0), ("sequence4xtensor2", "fastv", False, True, 0),
         ("sequence2", "step", True, True, 16)]


@pytest.fixture(scope="module")
def sharded_results():
    import json
    # Unoptimised XLA CPU codegen: compiles several times faster; both sides run under it.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(TINY), json.dumps(CASES), "vlm"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", [f"{m}/{p}" + (f"/seq_block{s}" if s else "") for m, p, _, _, s in CASES])
def test_sequence_parallel_prompt_equals_one_device(sharded_results, case):
    r = sharded_results[case]
    assert r["kept_same"], r  # the global top-k keeps the one-device token set
    assert r["hidden"] <= 1e-5, r  # relative to the largest hidden value
    assert r["logits"] <= 1e-5 and r["cache"] <= 1e-5, r
    assert r["same_tokens"] and r["decode"] <= 1e-5, r  # the ordinary decode loop continues from the cache
    if "grad_h" in r:
        assert r["grad_h"] <= 1e-5 and r["grad_params"] <= 1e-4, r


def test_sequence_parallel_vlm_prefill_equals_one_device(sharded_results):
    r = sharded_results["vlm"]
    assert r["logits"] <= 1e-5 and r["cache"] <= 1e-5 and r["same_tokens"], r


def test_incoming_state_is_the_sequential_carry():
    # The associative scan over shards against the recurrence written out (shards emulated
    # by vmap over a named axis).
    P_, b, h, p, n = 5, 2, 3, 2, 4
    rng = np.random.default_rng(0)
    totals = -rng.uniform(0.1, 2.0, (P_, b, h)).astype(np.float32)
    finals = rng.normal(size=(P_, b, h, p, n)).astype(np.float32)
    s_in, s_out = jax.vmap(lambda a, s: incoming_state(a, s, "seq"), axis_name="seq")(totals, finals)
    carry = np.zeros((b, h, p, n), np.float32)
    for i in range(P_):
        np.testing.assert_allclose(np.asarray(s_in[i]), carry, rtol=1e-5, atol=1e-6)
        carry = np.exp(totals[i])[..., None, None] * carry + finals[i]
        np.testing.assert_allclose(np.asarray(s_out[i]), carry, rtol=1e-5, atol=1e-6)


def test_shard_plan_rounds_dropped_counts_to_the_shards():
    plan = rplan.named("step", 6, 40, 0.4)
    snapped = shard_plan(plan, 8)
    for (layer, keep), (layer2, keep2) in zip(plan.stages, snapped.stages):
        assert layer == layer2 and keep <= keep2 < keep + 8 and (40 - keep2) % 8 == 0
    assert shard_plan(None, 8) is None


def _one_device_mesh(names=("sequence",)):
    return jax.make_mesh((1,) * len(names), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=jax.devices()[:1])


def test_refusals_name_the_problem():
    lm = NemotronHForCausalLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
    h = jnp.zeros((1, 8, TINY["hidden_size"]))
    mask = jnp.ones((1, 8), bool)
    with pytest.raises(ValueError, match="no 'sequence' axis"):
        context_parallel_hidden(lm, h, mask, mesh=_one_device_mesh(("data",)))
    with pytest.raises(ValueError, match="smaller than the prompt length"):
        context_parallel_prefill(lm, jnp.ones((1, 8), jnp.int32), mask, 4, mesh=_one_device_mesh())
    with pytest.raises(ValueError, match="shorter than the Mamba conv's 3-token halo"):
        context_parallel_hidden(lm, h[:, :2], mask[:, :2], mesh=_one_device_mesh())
    with pytest.raises(ValueError, match="leaves 59 of 64 tokens, which do not split into 8 equal sequence shards"):
        check_stage_split(64, 5, 8, 2)


def test_one_shard_is_the_ordinary_pass():
    lm = NemotronHForCausalLM(LMConfig(**TINY), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (2, 24), 3, TINY["vocab_size"])
    mask = jnp.ones((2, 24), bool).at[0, :5].set(False)
    ref = lm.run_layers(lm.embed_tokens(ids), Layout.prompt(mask))[0]
    got, index = context_parallel_hidden(lm, lm.embed_tokens(ids), mask, mesh=_one_device_mesh())
    np.testing.assert_array_equal(np.asarray(index), np.broadcast_to(np.arange(24), (2, 24)))
    np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)], np.asarray(ref)[np.asarray(mask)], atol=1e-5)


def test_bench_context_cli(tmp_path):
    import json

    out = tmp_path / "context.json"
    proc = subprocess.run([sys.executable, "-m", "eval.bench_context", "--runlocal", "--layers", "8", "--frames", "4,8",
                           "--degrees", "1,4", "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["frames"], r["degree"]): r for r in report["rows"]}
    assert sorted(rows) == [(4, 1), (4, 4), (8, 1), (8, 4)]
    cfg = report["config"]
    kv_bytes = lambda t: t * cfg["num_key_value_heads"] * cfg["head_dim"] * 2 * 2  # k and v, bf16
    for frames in (4, 8):
        one, four = rows[frames, 1], rows[frames, 4]
        assert one["tokens"] == four["tokens"] == frames * 64 + 16 and four["local_tokens"] == one["tokens"] // 4
        # The first 8 layers (M-M-M-M*) hold an attention layer: a device holds its share of
        # the KV cache, and the longer prompt's temporaries shrink with the split.
        assert four["output_gib"] < one["output_gib"]
        assert one["comm_bytes_per_layer"] == dict(mamba=0, attention=0, mlp=0)
        # Ring attention: each device receives the other 3 shards' keys and values once.
        assert four["comm_bytes_per_layer"]["attention"] == kv_bytes(one["tokens"]) * 3 // 4
        for r in (one, four):
            assert abs(r["total_gib"] - r["params_gib"] - r["temp_gib"] - r["output_gib"]) < 1e-9
    assert rows[8, 4]["temp_gib"] < rows[8, 1]["temp_gib"]
    # The Mamba exchange (halo + every shard's state) does not grow with the prompt.
    assert rows[4, 4]["comm_bytes_per_layer"]["mamba"] == rows[8, 4]["comm_bytes_per_layer"]["mamba"] > 0
    wall = report["correctness_run"]
    assert wall["max_abs_logits_diff"] < 1e-4 and wall["one_device_seconds"] > 0 and wall["sequence8_seconds"] > 0
    bad = subprocess.run([sys.executable, "-m", "eval.bench_context", "--degrees", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error:") and "--degrees" in last
