"""Static, hashable visual-token reduction plans and the schedules that build them.

A plan says, for an LM of `num_layers` layers fed `num_visual` visual tokens,
how many visual tokens are kept before which layers:

    stages = ((layer, keep), ...)   layers strictly increasing, keeps non-increasing

Layer l sees `keep_at(l)` visual tokens: num_visual before the first stage,
else the keep of the last stage at or before l. The budget of a plan is the
mean over layers of keep_at(l) / num_visual (the share of visual
token-layers left, the quantity the paper's 25/35/50% budgets refer to).

Plans hold tuples and scalars only, so they are hashable and can be static
jit arguments (each distinct plan is one compilation; the shapes inside it
are fixed).

Builders solve a one-parameter schedule family for the requested budget:

    progressive(shape="step"|"linear"|"sigmoid")  low-to-high (the paper's),
    fastv(layer=K)                                 one shot at K,
    pyramid(num_stages)                            PyramidDrop, constant ratio,
    uniform_stride / random_plan                   fastv's schedule, baseline selectors.

Solving and rounding (all builders): the family's keep fractions f_s(theta)
are clipped to [1/num_visual, 1] and theta is found by bisection so the
real-valued budget equals the request; the real keeps num_visual * f_s are
floored, then rounded up in order of largest fractional part while that
brings the achieved budget closer to the request (largest-remainder
rounding weighted by the layers each stage covers: every keep stays within
one token of its real value, so the shape survives), then single-token moves
polish the total if one still helps; keeps stay non-increasing throughout.
One-stage plans thus get the nearest achievable budget; otherwise the error
is normally within half a token over the longest stage,
0.5 * max_stage_layers / (num_layers * num_visual) (not guaranteed when the
one-token floor or monotonicity blocks every useful move; the tests check
it for the paper's budgets). Stages that change
nothing (keep equal to the previous count) are dropped. `achieved_budget`
reports what was reached. A request the family cannot reach even with one
token kept at every stage raises PlanError with the minimum it can reach.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from reduction.prune import SELECTORS
from reduction.scores import ScoreConfig

SHAPES = ("step", "linear", "sigmoid")


class PlanError(ValueError):
    """An invalid plan or a budget a schedule cannot meet."""


@dataclass(frozen=True)
class ReductionPlan:
    """Where and how many visual tokens are kept (static config).

    Attributes:
      num_layers: LM layers.
      num_visual: visual tokens entering the LM (after any EVS), static.
      stages: ((layer, keep), ...): keep visual tokens before `layer`.
      selector: "score" (top-k of language-aware scores at that layer),
        "uniform" (evenly spaced tokens) or "random" (random subset, `seed`).
      scorer: how scores are computed when selector == "score".
      seed: seed of the "random" selector.
      name: label for reports.
    """

    num_layers: int
    num_visual: int
    stages: tuple[tuple[int, int], ...] = ()
    selector: str = "score"
    scorer: ScoreConfig = ScoreConfig()
    seed: int = 0
    name: str = ""

    def __post_init__(self):
        # Accept lists from callers but store tuples, so the plan stays hashable.
        try:
            stages = tuple((int(layer), int(keep)) for layer, keep in self.stages)
        except (TypeError, ValueError) as e:
            raise PlanError(f"stages must be (layer, keep) integer pairs, got {self.stages!r}") from e
        object.__setattr__(self, "stages", stages)
        self.validate()

    def validate(self):
        """Raises PlanError, naming the offending values, if the plan is invalid."""
        if self.num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {self.num_layers}")
        if self.num_visual < 1:
            raise PlanError(f"num_visual must be >= 1, got {self.num_visual}")
        if self.selector not in SELECTORS:
            raise PlanError(f"selector {self.selector!r} is not one of {SELECTORS}")
        if not isinstance(self.scorer, ScoreConfig):
            raise PlanError(f"scorer must be a ScoreConfig, got {type(self.scorer).__name__}")
        prev_layer, prev_keep = -1, self.num_visual
        for layer, keep in self.stages:
            if not 0 <= layer < self.num_layers:
                raise PlanError(f"stage layer {layer} is outside [0, {self.num_layers})")
            if layer <= prev_layer:
                raise PlanError(f"stage layers must strictly increase, got {layer} after {prev_layer}")
            if not 1 <= keep <= self.num_visual:
                raise PlanError(f"stage keep {keep} at layer {layer} is outside [1, {self.num_visual}]")
            if keep > prev_keep:
                raise PlanError(f"keep counts must not rise with depth: {keep} at layer {layer} "
                                f"after {prev_keep} at layer {prev_layer}")
            prev_layer, prev_keep = layer, keep
        budget = self.achieved_budget
        if not 0.0 < budget <= 1.0:  # Implied by the checks above; kept as the stated contract.
            raise PlanError(f"achieved budget {budget} is outside (0, 1]")

    def check_fits(self, *, num_layers: int, seq_len: int, visual_slots=None) -> None:
        """Refuses, before anything is traced, an input layout this plan cannot serve.

        The one place that checks a plan against a model and its input (the
        model's `check_inputs` calls it for every forward, prefill and generate).

        Args:
          num_layers: the LM's layers.
          seq_len: static tokens per row entering the LM (after EVS).
          visual_slots: visual slots per row: an int when the shapes fix it
            (the VLM's pixels), per-row counts (b,) of a concrete visual mask,
            or None when only traced values hold it.
        Raises:
          PlanError naming the plan's and the input's numbers.
        """
        if self.num_layers != num_layers:
            raise PlanError(f"reduction plan is for {self.num_layers} layers, the model has {num_layers}")
        if self.num_visual > seq_len:
            raise PlanError(f"reduction plan expects {self.num_visual} visual tokens per row, but a row holds "
                            f"only {seq_len} tokens")
        if visual_slots is None:
            return
        if isinstance(visual_slots, numbers.Integral):
            if visual_slots != self.num_visual:
                raise PlanError(f"reduction plan expects {self.num_visual} visual tokens per row, the input's "
                                f"shapes give {visual_slots} per row; build the plan for {visual_slots}")
            return
        counts = np.asarray(visual_slots).reshape(-1)
        bad = np.flatnonzero(counts != self.num_visual)
        if bad.size:
            rows = ", ".join(f"row {r}: {int(counts[r])}" for r in bad[:4]) + (" ..." if bad.size > 4 else "")
            raise PlanError(
                f"reduction plan expects {self.num_visual} visual tokens per row (slots, real or masked), "
                f"the input has {rows}; pad every row's video to the same frame bucket "
                "(hybridvlm.batch.pad_video_batch) or build the plan for this count")

    def keep_at(self, layer: int) -> int:
        """Visual tokens present at (entering) `layer`."""
        keep = self.num_visual
        for stage_layer, stage_keep in self.stages:
            if stage_layer > layer:
                break
            keep = stage_keep
        return keep

    @property
    def schedule(self) -> tuple[int, ...]:
        """keep_at(l) for every layer l."""
        return tuple(self.keep_at(layer) for layer in range(self.num_layers))

    @property
    def achieved_budget(self) -> float:
        """Mean over the layers of keep_at(l) / num_visual."""
        return sum(self.schedule) / (self.num_layers * self.num_visual)

    def describe(self) -> str:
        """One line: name, selector, stages (layer:keep), achieved budget."""
        stages = " ".join(f"L{layer}:{keep}" for layer, keep in self.stages) or "none"
        return (f"{self.name or 'plan'} [{self.selector}] {self.num_visual} visual x {self.num_layers} layers, "
                f"stages {stages}, budget {self.achieved_budget:.3f}")


# ----------------------------------------------------------------------------- helpers


def layers_of_kind(pattern: str, kinds: str = "*") -> tuple[int, ...]:
    """Indices of the layers whose Nemotron-H pattern character is in `kinds`.

    E.g. layers_of_kind(cfg.pattern) gives the attention layers, the only
    places TimeViper-style baselines prune at; layers_of_kind(cfg.pattern, "M*")
    the mixer layers, whose projections give language-aware scores (a stage
    before a trailing MLP layer has no later mixer to score with).
    """
    return tuple(i for i, c in enumerate(pattern) if c in kinds)


def _check_request(num_layers, num_visual, budget):
    if num_layers < 1 or num_visual < 1:
        raise PlanError(f"need num_layers >= 1 and num_visual >= 1, got {num_layers}, {num_visual}")
    if not (isinstance(budget, numbers.Real) and 0.0 < budget <= 1.0):
        raise PlanError(f"budget must be in (0, 1], got {budget!r}")


def _allowed(layers, num_layers):
    """Sorted unique allowed stage layers, or None for any layer."""
    if layers is None:
        return None
    allowed = sorted({int(a) for a in layers})
    if not allowed:
        raise PlanError("layers is empty: no layer to place a stage at")
    bad = [a for a in allowed if not 0 <= a < num_layers]
    if bad:
        raise PlanError(f"allowed layers {bad} are outside [0, {num_layers})")
    return allowed


def _snap(stage_layers, allowed):
    """Moves each layer to the nearest allowed one (ties: the shallower);
    stages landing on the same layer merge."""
    if allowed is None:
        return sorted(set(stage_layers))
    return sorted({min(allowed, key=lambda a: (abs(a - layer), a)) for layer in stage_layers})


def _spaced(start, num_layers, num_stages):
    """num_stages layers evenly spaced over [start, num_layers), the first at start."""
    span = num_layers - start
    return [start + (s * span) // num_stages for s in range(num_stages)]


def _solve(num_layers, num_visual, budget, stage_layers, fractions: Callable[[float], np.ndarray], what):
    """Integer keeps for `stage_layers` that meet `budget` (see module docstring).

    fractions(theta), theta in [0, 1], gives the keep fraction of each stage:
    non-increasing over stages, non-decreasing in theta, all 1 at theta = 1.
    Returns the compacted stages ((layer, keep), ...).
    """
    L, V = num_layers, num_visual
    ends = list(stage_layers[1:]) + [L]
    lengths = np.array([e - s for s, e in zip(stage_layers, ends)], float)  # layers each stage covers
    head = stage_layers[0]  # layers before the first stage keep everything

    def real_budget(theta):
        return (head + lengths @ np.clip(fractions(theta), 1.0 / V, 1.0)) / L

    lowest = real_budget(0.0)
    if budget < lowest - 1e-12:
        raise PlanError(f"{what}: budget {budget} is below the minimum {lowest:.4f} this schedule can reach "
                        f"(1 token kept at every stage, {head} of {L} layers unpruned before layer {head})")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if real_budget(mid) < budget else (lo, mid)
    real = np.clip(V * np.clip(fractions(hi), 0.0, 1.0), 1.0, V)
    target = budget * L * V  # visual token-layers
    keeps = np.floor(real).astype(int)
    total = head * V + lengths @ keeps

    # Round up in order of largest fractional part (each stage moves by at most
    # one token from its real value, so the shape is kept) while that brings
    # the total closer to the target; order ties go to the shallower stage,
    # which keeps the keeps non-increasing.
    for s in np.argsort(-(real - keeps), kind="stable"):
        upper = keeps[s - 1] if s else V
        if keeps[s] + 1 <= upper and abs(total + lengths[s] - target) < abs(total - target):
            keeps[s] += 1
            total += lengths[s]

    # Polish: single-token moves while one brings the total closer (rarely any).
    for _ in range(len(keeps) * V):
        best = None
        for s in range(len(keeps)):
            for step in (-1, 1):
                k = keeps[s] + step
                upper = keeps[s - 1] if s else V
                lower = keeps[s + 1] if s + 1 < len(keeps) else 1
                if lower <= k <= upper:
                    err = abs(total + step * lengths[s] - target)
                    if best is None or err < best[0]:
                        best = (err, s, step)
        if best is None or best[0] >= abs(total - target) - 1e-9:
            break
        _, s, step = best
        keeps[s] += step
        total += step * lengths[s]

    stages, prev = [], V
    for layer, keep in zip(stage_layers, keeps):
        if keep < prev:  # a stage keeping the previous count prunes nothing
            stages.append((int(layer), int(keep)))
            prev = keep
    return tuple(stages)


def _plan(num_layers, num_visual, stages, *, selector, scorer, seed, name):
    return ReductionPlan(num_layers=num_layers, num_visual=num_visual, stages=stages, selector=selector,
                         scorer=scorer if scorer is not None else ScoreConfig(), seed=seed, name=name)


# ----------------------------------------------------------------------------- builders


def progressive(num_layers: int, num_visual: int, budget: float, *, shape: str = "step",
                start_layer: int = 0, num_stages: int | None = None, width: float | None = None,
                layers: Sequence[int] | None = None, selector: str = "score",
                scorer: ScoreConfig | None = None, seed: int = 0, name: str = "") -> ReductionPlan:
    """Low-to-high schedule: most tokens kept in shallow layers, harder pruning with depth.

    Layers before `start_layer` keep everything. Stage layers: `num_stages`
    evenly spaced over [start_layer, num_layers), the first at start_layer
    (default 3 for "step"; default every layer for "linear" / "sigmoid"),
    snapped to `layers` if given. Keep fraction at stage s (layer l_s), with
    the free parameter solved for the budget:
      step:    1 - (s + 1) delta            (a staircase falling by delta per stage)
      linear:  1 - (l_s - start_layer + 1) delta   (linear in depth, from 1 just
               before start_layer)
      sigmoid: sigmoid((c - l_s) / width)   (centre c free; width defaults to
               (num_layers - start_layer) / 8)
    each clipped to at least one token. The reachable budgets are
    (start_layer / num_layers, 1]; start_layer=0 default so the paper's 25%
    is reachable on any depth.
    """
    _check_request(num_layers, num_visual, budget)
    if shape not in SHAPES:
        raise PlanError(f"shape {shape!r} is not one of {SHAPES}")
    if not 0 <= start_layer < num_layers:
        raise PlanError(f"start_layer {start_layer} is outside [0, {num_layers})")
    if num_stages is not None and num_stages < 1:
        raise PlanError(f"num_stages must be >= 1, got {num_stages}")
    allowed = _allowed(layers, num_layers)

    if num_stages is None and shape != "step":
        candidates = list(range(start_layer, num_layers))
        if allowed is not None:
            candidates = [a for a in allowed if a >= start_layer]
            if not candidates:
                raise PlanError(f"no allowed layer at or after start_layer {start_layer}: {allowed}")
        stage_layers = candidates
    else:
        stage_layers = _snap(_spaced(start_layer, num_layers, num_stages or 3), allowed)
    pos = np.array(stage_layers, float)

    if shape == "step":
        index = np.arange(1, len(pos) + 1)

        def fractions(theta):
            return 1.0 - index * (1.0 - theta)
    elif shape == "linear":
        depth = np.maximum(pos - start_layer + 1, 1.0)

        def fractions(theta):
            return 1.0 - depth * (1.0 - theta)
    else:
        w = width if width is not None else max(num_layers - start_layer, 1) / 8.0
        if w <= 0:
            raise PlanError(f"sigmoid width must be > 0, got {w}")
        # Centre range wide enough that theta=0 keeps ~nothing and theta=1 keeps ~everything.
        lo_c, hi_c = start_layer - 40.0 * w, num_layers + 40.0 * w

        def fractions(theta):
            if theta >= 1.0:
                return np.ones_like(pos)
            c = lo_c + theta * (hi_c - lo_c)
            return 1.0 / (1.0 + np.exp(-(c - pos) / w))

    what = f"progressive({shape}, start_layer={start_layer})"
    stages = _solve(num_layers, num_visual, budget, stage_layers, fractions, what)
    return _plan(num_layers, num_visual, stages, selector=selector, scorer=scorer, seed=seed,
                 name=name or f"progressive-{shape}")


def _one_shot(num_layers, num_visual, budget, layer, layers, what):
    _check_request(num_layers, num_visual, budget)
    if not 0 <= layer < num_layers:
        raise PlanError(f"{what}: layer {layer} is outside [0, {num_layers})")
    (k,) = _snap([layer], _allowed(layers, num_layers))
    # budget = (K + (L - K) r) / L, r = keep / num_visual: linear in the single keep.
    stages = _solve(num_layers, num_visual, budget, [k], lambda theta: np.array([theta]), f"{what}(layer={k})")
    return stages, k


def fastv(num_layers: int, num_visual: int, budget: float, *, layer: int = 2,
          layers: Sequence[int] | None = None, scorer: ScoreConfig | None = None,
          name: str = "") -> ReductionPlan:
    """FastV: one-shot pruning before layer K (snapped to `layers` if given).

    keep = round(num_visual * (budget * L - K) / (L - K)), the nearest count;
    PlanError if even 1 token from K on exceeds the budget.
    """
    stages, k = _one_shot(num_layers, num_visual, budget, layer, layers, "fastv")
    return _plan(num_layers, num_visual, stages, selector="score", scorer=scorer, seed=0,
                 name=name or f"fastv-K{k}")


def uniform_stride(num_layers: int, num_visual: int, budget: float, *, layer: int = 2,
                   layers: Sequence[int] | None = None, name: str = "") -> ReductionPlan:
    """fastv's schedule with evenly spaced tokens kept (query-agnostic baseline)."""
    stages, k = _one_shot(num_layers, num_visual, budget, layer, layers, "uniform_stride")
    return _plan(num_layers, num_visual, stages, selector="uniform", scorer=None, seed=0,
                 name=name or f"uniform-K{k}")


def random_plan(num_layers: int, num_visual: int, budget: float, *, layer: int = 2, seed: int = 0,
                layers: Sequence[int] | None = None, name: str = "") -> ReductionPlan:
    """fastv's schedule with a random subset kept (fixed `seed`; query-agnostic baseline)."""
    stages, k = _one_shot(num_layers, num_visual, budget, layer, layers, "random_plan")
    return _plan(num_layers, num_visual, stages, selector="random", scorer=None, seed=seed,
                 name=name or f"random-K{k}")


def pyramid(num_layers: int, num_visual: int, budget: float, *, num_stages: int = 4,
            layers: Sequence[int] | None = None, scorer: ScoreConfig | None = None,
            name: str = "") -> ReductionPlan:
    """PyramidDrop: num_stages equal-depth segments, each keeping lambda x the previous.

    Stage boundaries at floor(s * L / num_stages), s = 1..num_stages-1
    (snapped to `layers` if given); stage s keeps lambda^s of the visual
    tokens, lambda solved for the budget (bisection) before rounding.
    """
    _check_request(num_layers, num_visual, budget)
    if num_stages < 2:
        raise PlanError(f"pyramid needs num_stages >= 2 (one boundary), got {num_stages}")
    bounds = [(s * num_layers) // num_stages for s in range(1, num_stages)]
    if any(b < 1 for b in bounds):
        raise PlanError(f"pyramid: {num_stages} stages do not fit in {num_layers} layers")
    stage_layers = _snap(bounds, _allowed(layers, num_layers))
    powers = np.arange(1, len(stage_layers) + 1, dtype=float)
    stages = _solve(num_layers, num_visual, budget, stage_layers, lambda lam: lam ** powers,
                    f"pyramid(num_stages={num_stages})")
    return _plan(num_layers, num_visual, stages, selector="score", scorer=scorer, seed=0,
                 name=name or f"pyramid-{num_stages}")



# Every schedule by name: the progressive shapes, the one-shot and pyramid baselines.
NAMED = SHAPES + ("fastv", "pyramid", "uniform", "random")


def named(shape: str, num_layers: int, num_visual: int, budget: float, *, scorer: ScoreConfig | None = None,
          layer: int = 2, layers: Sequence[int] | None = None) -> ReductionPlan:
    """The plan called `shape` (one of NAMED) at `budget`: a progressive shape
    ("step", "linear", "sigmoid"), FastV, PyramidDrop, or the query-agnostic uniform /
    random selections at FastV's layer.

    layer: the one-shot plans' pruning layer; layers: None (stages anywhere) or the
    allowed stage layers (snapped to). PlanError for an unknown name or a budget the
    schedule cannot meet.
    """
    if shape in SHAPES:
        return progressive(num_layers, num_visual, budget, shape=shape, scorer=scorer, layers=layers)
    if shape == "fastv":
        return fastv(num_layers, num_visual, budget, layer=layer, scorer=scorer, layers=layers)
    if shape == "pyramid":
        return pyramid(num_layers, num_visual, budget, scorer=scorer, layers=layers)
    if shape == "uniform":
        return uniform_stride(num_layers, num_visual, budget, layer=layer, layers=layers)
    if shape == "random":
        return random_plan(num_layers, num_visual, budget, layer=layer, layers=layers)
    raise PlanError(f"unknown plan {shape!r}; choose one of {', '.join(NAMED)}")
