"""Reduction plans: validation, budgets, rounding, and the schedule builders."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from reduction.plan import (PlanError, ReductionPlan, fastv, layers_of_kind, progressive, pyramid,
                            random_plan, uniform_stride)
from reduction.scores import ScoreConfig

L, V = 62, 1024  # the 12B LM depth, a small visual count
ATTN = (7, 16, 25, 34, 43, 52)  # the 12B LM's attention layers


def _stage_lengths(plan):
    ends = [layer for layer, _ in plan.stages[1:]] + [plan.num_layers]
    return [e - layer for (layer, _), e in zip(plan.stages, ends)]


def _check_well_formed(plan, budget):
    """Keeps non-increasing with depth, budget close to the request (within half
    a token over the longest stage, the documented rounding bound)."""
    sched = plan.schedule
    assert all(a >= b for a, b in zip(sched, sched[1:])), sched
    slack = 0.5 * max(_stage_lengths(plan), default=0) / (plan.num_layers * plan.num_visual)
    assert abs(plan.achieved_budget - budget) <= slack + 1e-12, (plan.describe(), budget)


# ----------------------------------------------------------------------------- the plan itself


def test_keep_at_schedule_and_budget_by_hand():
    plan = ReductionPlan(num_layers=4, num_visual=10, stages=((1, 6), (3, 2)))
    assert [plan.keep_at(layer) for layer in range(4)] == [10, 6, 6, 2]
    assert plan.schedule == (10, 6, 6, 2)
    assert plan.achieved_budget == pytest.approx(24 / 40)
    assert ReductionPlan(num_layers=4, num_visual=10).achieved_budget == 1.0


@pytest.mark.parametrize("kwargs, words", [
    (dict(stages=((2, 5), (2, 4))), ["strictly increase", "2"]),
    (dict(stages=((3, 5), (1, 4))), ["strictly increase", "1", "3"]),
    (dict(stages=((1, 5), (2, 6))), ["rise", "6", "5"]),
    (dict(stages=((1, 0),)), ["keep 0", "[1, 10]"]),
    (dict(stages=((1, 11),)), ["keep 11", "[1, 10]"]),
    (dict(stages=((4, 5),)), ["layer 4", "[0, 4)"]),
    (dict(stages=((-1, 5),)), ["layer -1"]),
    (dict(selector="topk"), ["'topk'"]),
    (dict(num_visual=0), ["num_visual", "0"]),
    (dict(stages=((1, "x"),)), ["integer pairs"]),
])
def test_invalid_plans_raise_with_the_offending_values(kwargs, words):
    args = dict(num_layers=4, num_visual=10) | kwargs
    with pytest.raises(PlanError) as err:
        ReductionPlan(**args)
    for word in words:
        assert word in str(err.value)
    assert isinstance(err.value, ValueError)


def test_plan_is_hashable_and_a_static_jit_argument():
    a = ReductionPlan(num_layers=4, num_visual=10, stages=[[1, 6], [3, 2]])  # lists are normalised
    b = ReductionPlan(num_layers=4, num_visual=10, stages=((1, 6), (3, 2)))
    assert a == b and hash(a) == hash(b) and isinstance(a.stages[0], tuple)
    assert a != ReductionPlan(num_layers=4, num_visual=10, stages=((1, 6), (3, 2)),
                              scorer=ScoreConfig(reduce="max"))

    traces = []

    def f(x, plan):
        traces.append(plan)
        return x[: plan.keep_at(plan.num_layers - 1)]

    g = jax.jit(f, static_argnums=1)
    assert g(jnp.arange(10), a).shape == (2,)
    g(jnp.arange(10), b)  # an equal plan reuses the compilation
    assert len(traces) == 1


def test_describe_names_stages_and_budget():
    text = fastv(L, V, 0.5, layer=2).describe()
    assert "fastv-K2" in text and "L2:" in text and "0.500" in text


# ----------------------------------------------------------------------------- one-shot builders


@pytest.mark.parametrize("budget, layer", [(b, k) for b, k in itertools.product([0.1, 0.25, 0.35, 0.5, 0.9], [0, 2, 7, 30])
                                            if b > k / L + 1 / V])
def test_fastv_keep_is_the_nearest_achievable(budget, layer):
    plan = fastv(L, V, budget, layer=layer)
    (stage_layer, keep), = plan.stages
    assert stage_layer == layer
    # Exhaustive: no other single keep count gets closer to the budget.
    errors = [abs((layer * V + (L - layer) * r) / (L * V) - budget) for r in range(1, V + 1)]
    assert abs(plan.achieved_budget - budget) == pytest.approx(min(errors), abs=1e-15)
    assert keep == round(V * (budget * L - layer) / (L - layer))


def test_fastv_budget_too_small_for_its_layer_raises():
    # Keeping 1 token from layer 30 on still leaves 30/62 of the budget unpruned.
    with pytest.raises(PlanError, match=r"minimum 0\.48"):
        fastv(L, V, 0.25, layer=30)
    with pytest.raises(PlanError, match="outside"):
        fastv(L, V, 0.25, layer=L)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budget_outside_unit_interval_raises(budget):
    for build in (fastv, pyramid, progressive, uniform_stride, random_plan):
        with pytest.raises(PlanError, match=r"\(0, 1\]"):
            build(L, V, budget)


def test_full_budget_prunes_nothing():
    for plan in (fastv(L, V, 1.0), pyramid(L, V, 1.0), progressive(L, V, 1.0, shape="sigmoid")):
        assert plan.stages == () and plan.achieved_budget == 1.0


def test_baselines_share_fastv_schedule_with_their_selectors():
    ref = fastv(L, V, 0.3, layer=4)
    uni = uniform_stride(L, V, 0.3, layer=4)
    rnd = random_plan(L, V, 0.3, layer=4, seed=7)
    assert uni.stages == rnd.stages == ref.stages
    assert (ref.selector, uni.selector, rnd.selector) == ("score", "uniform", "random")
    assert rnd.seed == 7 and rnd != random_plan(L, V, 0.3, layer=4, seed=8)


# ----------------------------------------------------------------------------- pyramid


def test_pyramid_stages_at_equal_depths_with_a_constant_ratio():
    plan = pyramid(L, V, 0.5, num_stages=4)
    assert [layer for layer, _ in plan.stages] == [15, 31, 46]  # floor(s * 62 / 4)
    keeps = [V] + [k for _, k in plan.stages]
    ratios = [b / a for a, b in zip(keeps, keeps[1:])]
    assert max(ratios) - min(ratios) < 0.01, ratios  # constant lambda up to rounding
    _check_well_formed(plan, 0.5)
    # PyramidDrop's usual lambda = 0.5 on 4 stages is budget (1 + .5 + .25 + .125) / 4 on a
    # depth that divides evenly: the solver recovers it.
    halving = pyramid(32, 1024, (1 + 0.5 + 0.25 + 0.125) / 4)
    assert [k for _, k in halving.stages] == [512, 256, 128]


def test_pyramid_below_its_first_stage_raises():
    with pytest.raises(PlanError, match="minimum"):
        pyramid(L, V, 0.2, num_stages=4)  # the first 15 of 62 layers keep everything


# ----------------------------------------------------------------------------- progressive


@pytest.mark.parametrize("shape, budget", list(itertools.product(["step", "linear", "sigmoid"], [0.25, 0.35, 0.5])))
def test_progressive_is_low_to_high_and_meets_the_budget(shape, budget):
    plan = progressive(L, V, budget, shape=shape)
    _check_well_formed(plan, budget)
    sched = plan.schedule
    assert sched[0] > budget * V > sched[-1]  # most tokens shallow, fewest deep
    assert len(plan.stages) >= 2


def test_progressive_step_shape():
    plan = progressive(L, V, 0.5, shape="step", num_stages=3)
    layers = [layer for layer, _ in plan.stages]
    assert layers == [0, 20, 41]  # start + floor(s * 62 / 3)
    keeps = [V] + [k for _, k in plan.stages]
    drops = [a - b for a, b in zip(keeps, keeps[1:])]
    assert max(drops) - min(drops) <= 2  # a staircase with equal steps (delta), up to rounding


def test_progressive_linear_is_linear_in_depth():
    plan = progressive(L, V, 0.6, shape="linear")
    sched = (V,) + plan.schedule  # the line starts from 1 just before start_layer
    diffs = [a - b for a, b in zip(sched, sched[1:]) if b > 1]
    assert max(diffs) - min(diffs) <= 2  # constant slope, each keep within a token of the line


def test_progressive_start_layer_keeps_everything_before_it():
    plan = progressive(L, V, 0.5, shape="sigmoid", start_layer=10, num_stages=4)
    assert plan.schedule[:10] == (V,) * 10 and plan.stages[0][0] == 10
    _check_well_formed(plan, 0.5)
    with pytest.raises(PlanError, match="minimum"):
        progressive(L, V, 0.15, start_layer=10)  # 10/62 = 0.16 is unreachable


def test_progressive_sigmoid_is_a_sigmoid():
    plan = progressive(L, V, 0.5, shape="sigmoid", width=4.0)
    sched = [k / V for k in plan.schedule]
    # Steepest drop in the middle of the transition, flat at the ends.
    drops = [a - b for a, b in zip(sched, sched[1:])]
    steepest = max(range(len(drops)), key=drops.__getitem__)
    assert 0.3 < sched[steepest] < 0.7
    assert drops[0] < drops[steepest] / 3 and drops[-1] < drops[steepest] / 3


def test_progressive_rejects_bad_arguments():
    with pytest.raises(PlanError, match="shape"):
        progressive(L, V, 0.5, shape="cosine")
    with pytest.raises(PlanError, match="start_layer"):
        progressive(L, V, 0.5, start_layer=L)


# ----------------------------------------------------------------------------- allowed layers


def test_layers_of_kind():
    assert layers_of_kind("M-*M*-") == (2, 4)
    assert layers_of_kind("M-*M*-", "M") == (0, 3)


def test_stages_snap_to_allowed_layers():
    plan = fastv(L, V, 0.3, layer=3, layers=ATTN)
    assert plan.stages[0][0] == 7 and plan.name == "fastv-K7"
    _check_well_formed(plan, 0.3)  # solved after snapping
    # Ties go to the shallower allowed layer.
    assert fastv(L, V, 0.5, layer=5, layers=(3, 7)).stages[0][0] == 3
    for plan in (pyramid(L, V, 0.5, layers=ATTN), progressive(L, V, 0.35, layers=ATTN),
                 progressive(L, V, 0.35, shape="linear", layers=ATTN),
                 progressive(L, V, 0.35, shape="sigmoid", layers=ATTN), random_plan(L, V, 0.4, layers=ATTN)):
        assert {layer for layer, _ in plan.stages} <= set(ATTN), plan.describe()
        assert len(plan.stages) >= 1


def test_invalid_allowed_layers_raise():
    with pytest.raises(PlanError, match="outside"):
        fastv(L, V, 0.5, layers=(7, 70))
    with pytest.raises(PlanError, match="empty"):
        fastv(L, V, 0.5, layers=())
