"""Smoke test of eval/bench_prefill.py: the benchmark's code path on a tiny
config with 1 repeat; checks the row / JSON / table fields, not timings."""

import json

import jax.numpy as jnp
import pytest

from eval import bench_prefill as bp
from hybridvlm.config import LMConfig

TINY = dict(vocab_size=64, hidden_size=32, pattern="M-M*-M-", num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8,
            n_groups=2, conv_kernel=4, chunk_size=16)


@pytest.fixture(scope="module")
def result():
    cfg = LMConfig(**TINY)
    return cfg, bp.benchmark(cfg, prefix=4, num_visual=64, question=8, budgets=[0.5],
                             shapes=["step", "fastv", "uniform"], repeats=1)


def test_rows_and_fields(result):
    cfg, res = result
    full = res["full"]
    assert full["seconds"] > 0 and full["tokens"] == 4 + 64 + 8 and full["tokens_per_s"] > 0
    assert res["num_query"] == 8
    assert [r["shape"] for r in res["rows"]] == ["step", "fastv", "uniform"]
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["speedup"] > 0
        assert r["achieved_budget"] == pytest.approx(0.5, abs=0.05)
        assert r["ideal_speedup"] > 1.0 and r["ideal_speedup_no_scoring"] >= r["ideal_speedup"]
        if r["selector"] == "score":
            assert r["unscored_seconds"] > 0 and r["scoring_overhead"] < 1.0
        else:
            assert r["scoring_overhead"] is None
    json.dumps(res)  # serialisable
    table = "\n".join([bp.HEADER, bp.format_full(full)] + [bp.format_row(r) for r in res["rows"]])
    assert "progressive-step" in table and "fastv-K2" in table and "uniform-K2" in table


def test_unreachable_budget_is_recorded_not_fatal():
    cfg = LMConfig(**TINY)
    res = bp.benchmark(cfg, prefix=2, num_visual=16, question=4, budgets=[0.05], shapes=["fastv"], repeats=1,
                       overhead=False)
    (row,) = res["rows"]
    assert "PlanError" in row["error"] and "failed" in bp.format_row(row)


def test_flop_model_orders():
    cfg = LMConfig(**TINY)
    t = 100
    assert bp.flop_model(cfg, t) > bp.flop_model(cfg, t // 2) * 2  # attention is super-linear
    plan = bp.make_plans("step", cfg.num_layers, 64, 0.25, scorer=bp.ScoreConfig(max_query=8), fastv_layer=2)
    assert bp.flop_model(cfg, 76, plan, 8) > bp.flop_model(cfg, 76, plan, 8, scoring=False)


def test_scoring_flops_count_what_the_model_computes():
    """The FLOP model's scoring cost against XLA's count of `visual_scores` for one Mamba and one
    attention layer. Mamba scoring projects only in_proj's B, C and dt columns
    (`Mamba2Mixer.project_scoring`); charging the whole in_proj would be ~13x too much here."""
    import jax
    from flax import nnx

    from hybridvlm.cache import Layout
    from hybridvlm.lm import NemotronHForCausalLM

    # Wide enough that matmuls dominate XLA's count (norms and activations are not in the model).
    cfg = LMConfig(vocab_size=64, hidden_size=256, pattern="M*", num_attention_heads=4, num_key_value_heads=2,
                   head_dim=32, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=16, n_groups=2, conv_kernel=4,
                   chunk_size=32)
    graphdef, state = nnx.split(NemotronHForCausalLM(cfg, rngs=nnx.Rngs(0)))
    t, num_visual, num_query = 256, 192, 32
    scorer = bp.ScoreConfig(max_query=num_query)
    h = jax.random.normal(jax.random.key(0), (1, t, cfg.hidden_size))
    mask = jnp.ones((1, t), bool)
    visual = jnp.zeros((1, t), bool).at[:, 16:16 + num_visual].set(True)
    for i, kind in enumerate(cfg.pattern):
        fn = jax.jit(lambda s, h, m, v, i=i: nnx.merge(graphdef, s).visual_scores(i, h, Layout.prompt(m), v, scorer))
        cost = fn.lower(state, h, mask, visual).compile().cost_analysis()
        xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
        model = bp.scoring_flops(cfg, kind, t, num_visual, num_query, scorer)
        assert model == pytest.approx(xla, rel=0.15), (kind, model, xla)
    # One pass fewer without row normalisation.
    one_pass = bp.ScoreConfig(max_query=num_query, normalize_rows=False)
    assert bp.scoring_flops(cfg, "M", t, num_visual, num_query, one_pass) < bp.scoring_flops(cfg, "M", t, num_visual,
                                                                                              num_query, scorer)
