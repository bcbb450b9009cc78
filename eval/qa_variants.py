"""The reduction variants an accuracy run compares, and their static plan per frame bucket.

    variants = build_variants(["full", "progressive", "fastv"], [0.25, 0.5], mamba_modes=["decay_free"], evs=[0.0])
    plan = variants[1].plan(num_layers=9, num_visual=512)          # a ReductionPlan (None for "full")

A variant is one (plan name, budget, Mamba score mode, EVS rate). "full" keeps every
visual token (one variant per EVS rate, whatever the budgets); "progressive" is the paper's
low-to-high step schedule; the other names are `reduction.plan.NAMED` ("fastv", "pyramid",
"uniform", "random", "linear", "sigmoid", "step"). The Mamba score mode matters only to
plans that score tokens (not "full", "uniform", "random"), so those get one variant per
budget whatever `mamba_modes` says.

Budgets are the kept share of visual token-layers *entering the LM*; with EVS (rate r)
the LM sees (1 - r) of the visual tokens, so the overall kept share is about
(1 - r) * budget (`Variant.overall_budget` reports the exact one of a bucket).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from reduction import plan as rp
from reduction.evs import evs_keep_count
from reduction.scores import MAMBA_MODES, ScoreConfig

FULL = "full"
ALIASES = {"progressive": "step"}  # the paper's schedule
PLAN_NAMES = (FULL, *ALIASES, *rp.NAMED)
UNSCORED = (FULL, "uniform", "random")  # plans whose selection ignores the Mamba score mode


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to evaluate: plan name, requested budget (1.0 for full), Mamba
    score mode (None where it plays no part) and EVS rate (0: off)."""

    name: str
    budget: float
    mamba_mode: str | None
    evs: float = 0.0

    @property
    def label(self) -> str:
        """A unique, readable key: "progressive@0.25", "fastv@0.5/decay", "full+evs0.5"."""
        s = self.name if self.name == FULL else f"{self.name}@{self.budget:g}"
        if self.mamba_mode not in (None, ScoreConfig().mamba_mode):
            s += f"/{self.mamba_mode}"
        return s + (f"+evs{self.evs:g}" if self.evs else "")

    def plan(self, num_layers: int, num_visual: int) -> rp.ReductionPlan | None:
        """The static plan for `num_visual` visual tokens entering the LM (None: keep all).
        PlanError when the schedule cannot meet the budget."""
        if self.name == FULL:
            return None
        shape = ALIASES.get(self.name, self.name)
        scorer = ScoreConfig(mamba_mode=self.mamba_mode) if self.mamba_mode else None
        return rp.named(shape, num_layers, num_visual, self.budget, scorer=scorer)

    def lm_visual(self, tubelets: int, tokens_per_tubelet: int) -> int:
        """Visual tokens per row entering the LM for a bucket of `tubelets` tubelets."""
        if self.evs:
            return evs_keep_count(tubelets, tokens_per_tubelet, self.evs)
        return tubelets * tokens_per_tubelet

    def overall_budget(self, plan: rp.ReductionPlan | None, tubelets: int, tokens_per_tubelet: int) -> float:
        """Kept share of the visual token-layers of the bucket, EVS included."""
        kept = self.lm_visual(tubelets, tokens_per_tubelet) / (tubelets * tokens_per_tubelet)
        return kept * (1.0 if plan is None else plan.achieved_budget)


def build_variants(plans: Sequence[str], budgets: Sequence[float], *, mamba_modes: Sequence[str] = ("decay_free",),
                   evs: Sequence[float] = (0.0,)) -> list[Variant]:
    """Every variant of the grid, "full" first, without duplicates, in a stable order.
    ValueError naming the unknown plan, mode, budget or rate."""
    for p in plans:
        if p not in PLAN_NAMES:
            raise ValueError(f"unknown plan {p!r}; choose among {', '.join(PLAN_NAMES)}")
    for m in mamba_modes:
        if m not in MAMBA_MODES:
            raise ValueError(f"unknown Mamba score mode {m!r}; choose among {', '.join(MAMBA_MODES)}")
    for b in budgets:
        if not 0.0 < b <= 1.0:
            raise ValueError(f"budget {b} is not in (0, 1]")
    for r in evs:
        if not 0.0 <= r < 1.0:
            raise ValueError(f"EVS rate {r} is not in [0, 1)")
    out: list[Variant] = []
    ordered = sorted(plans, key=lambda p: p != FULL)
    for rate in evs:
        for p in ordered:
            if p == FULL:
                out.append(Variant(FULL, 1.0, None, rate))
                continue
            modes = [None] if p in UNSCORED else list(mamba_modes)
            out += [Variant(p, float(b), m, rate) for b in budgets for m in modes]
    seen, unique = set(), []
    for v in out:
        if v not in seen:
            seen.add(v)
            unique.append(v)
    return unique
