"""Prefill wall time of the hybrid LM, full vs visual-token-reduced.

    python -m eval.bench_prefill                          # configs/bench_hybrid.py, all plans
    python -m eval.bench_prefill --budgets 0.25 --shapes step,fastv --repeats 2 --json out.json
    python -m eval.bench_prefill --runlocal               # tiny sizes, quick check
    python -m eval.bench_prefill --config configs/tiny_lm.py --config.model.chunk_size=64
    python -m eval.bench_prefill --help                   # flags and config fields

The LM runs from input embeddings (1, T, d) laid out like a video prompt:
`prefix` text tokens, `num_visual` visual tokens, `question` text tokens at
the end (config field `bench`, or flags). The timed function is the LM's
layers plus the head on the LAST position only (prefill, not the LM head
over every token): `model.run_layers` + `model.logits(h[:, -1:])`.

For each plan (progressive step / linear / sigmoid, fastv, pyramid,
uniform_stride, random_plan; uniform and random use fastv's schedule) and
budget, the table shows the achieved budget, the measured speedup
(full time / reduced time), the FLOP-model ideal speedup of that plan
(`flop_model`, scoring included), and the scoring overhead: the same
schedule is also timed with the "random" selector, which runs the same
top-k selection and gather on random numbers instead of scores, and
overhead = (t_score - t_random) / t_score. (The "uniform" selector is not a
fair baseline: its rank lookup costs more than top-k on CPU.)

Timing (as eval/bench_ssd.py): each function is compiled ahead of time
(`jit(...).lower(...).compile()`, compile excluded), called once as a
warm-up, then `--repeats` timed calls with `block_until_ready`; the median is
reported. Same model, same inputs for every point. A point that fails (e.g. a
budget a schedule cannot reach, out of memory) is recorded, not fatal. Flags
and config values are checked before the model is built; an error prints one
line (`--debug` for the traceback).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

import configs
from eval.timing import timed
from hybridvlm import atomic, cli, cli_checks
from hybridvlm.cache import Layout
from hybridvlm.config import ATTENTION, LAYER_CHARS, MAMBA, MLP, ConfigError, LMConfig
from hybridvlm.lm import NemotronHForCausalLM
from reduction import plan as rp
from reduction.scores import ScoreConfig

SHAPES = rp.NAMED


# --runlocal: a small model and prompt that run the whole grid in about a minute on a laptop CPU.
RUNLOCAL_MODEL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=16, chunk_size=64,
                      vocab_size=256)
RUNLOCAL_BENCH = dict(prefix=8, num_visual=1024, question=16)


# ----------------------------------------------------------------------------- FLOP model


def define_flags() -> None:
    """Registers the CLI flags; called under __main__ only, so the eval modules can be
    imported together (they share flag names such as --config and --json)."""
    config_flags.DEFINE_config_file("config", configs.path("bench_hybrid"), "ml_collections LM config file.")
    flags.DEFINE_list("budgets", ["0.25", "0.35", "0.5"], "Visual-token budgets.")
    flags.DEFINE_list("shapes", list(SHAPES), f"Plans to time, of {SHAPES}.")
    flags.DEFINE_integer("repeats", 3, "Timed calls per point (median reported).", lower_bound=1)
    flags.DEFINE_integer("num_visual", None, "Visual tokens (default: config bench.num_visual).", lower_bound=1)
    flags.DEFINE_integer("prefix", None, "Text tokens before the video (default: config bench.prefix).",
                         lower_bound=0)
    flags.DEFINE_integer("question", None, "Question tokens after the video (default: config bench.question).",
                         lower_bound=1)
    flags.DEFINE_integer("max_query", None, "ScoreConfig.max_query of the scored plans (default: the question "
                         "length; 0: ScoreConfig's default).", lower_bound=0)
    flags.DEFINE_integer("fastv_layer", 2, "K of fastv / uniform_stride / random_plan.", lower_bound=0)
    flags.DEFINE_string("stage_kinds", "", "Snap stage layers to layers of these pattern kinds (e.g. '*': "
                        "attention layers only, where scoring is cheap); empty: any layer (builders' default).")
    flags.DEFINE_bool("overhead", True,
                      "Also time each scored plan with the random selector (same selection, no scoring).")
    flags.DEFINE_bool("runlocal", False, "Shrink model and prompt for a quick check (1 repeat).")
    flags.DEFINE_string("json", None, "Write all rows, the config and machine info as JSON here.")


def layer_flops(cfg: LMConfig, kind: str, t: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one layer run on t tokens (batch 1).

    Mamba: in_proj, depthwise causal conv, chunked SSD (intra-chunk C.B and
    its product with x, chunk states and their read-out; as eval/bench_ssd),
    out_proj. MLP: up and down projections. Attention: q/k/v/o projections
    plus causal scores and values (t (t + 1) / 2 query-key pairs).
    Norms, activations, gathers: not counted (memory-bound, small).
    """
    d = cfg.hidden_size
    if kind == MLP:
        return 2.0 * t * 2 * d * cfg.intermediate_size
    if kind == MAMBA:
        h, p, n, g, cs = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.n_groups, cfg.chunk_size
        inner = cfg.mamba_intermediate
        proj = inner + cfg.conv_dim + h
        cs = min(cs, t)
        return (2.0 * t * d * proj + 2.0 * t * cfg.conv_kernel * cfg.conv_dim
                + 2.0 * t * (g * cs * n + h * cs * p + 2 * h * p * n) + 2.0 * t * inner * d)
    if kind == ATTENTION:
        nq, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        proj = 2.0 * t * d * (2 * nq * hd + 2 * kv * hd)
        pairs = t * (t + 1) / 2.0
        return proj + 2.0 * 2 * nq * hd * pairs
    raise ValueError(f"layer kind {kind!r}")


def scoring_flops(cfg: LMConfig, kind: str, t: int, num_visual: int, num_query: int,
                  scorer: ScoreConfig = ScoreConfig()) -> float:
    """Matmul FLOPs of scoring the visual tokens entering a stage, with layer `kind`'s projections.

    As the model computes them (`NemotronHForCausalLM.visual_scores`), over
    all t tokens: Mamba (`Mamba2Mixer.project_scoring`) only the B, C and dt
    columns of in_proj and the conv over the B and C channels (the z and x
    columns, most of in_proj, are skipped); attention (`project_qk`) q and k.
    Then the query-row scores over the keys, in two passes when
    `scorer.normalize_rows` (row norms, then normalised scores), else one:
    Mamba C_q . B_j per group (plus the per-head decay with mamba_mode
    "decay"), attention q . k per head. Norms, top-k and gather: not counted.
    """
    del num_visual  # every key is scored; the visual mask only zeroes the others
    d = cfg.hidden_size
    q = min(num_query, t)
    passes = 2 if scorer.normalize_rows else 1
    if kind == MAMBA:
        g, n, h = cfg.n_groups, cfg.ssm_state_size, cfg.mamba_num_heads
        bc = 2 * g * n
        per_pass = 2.0 * q * t * g * n + (2.0 * q * t * h if scorer.mamba_mode == "decay" else 0.0)
        return 2.0 * t * d * (bc + h) + 2.0 * t * cfg.conv_kernel * bc + passes * per_pass
    nq, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return 2.0 * t * d * (nq + kv) * hd + passes * 2.0 * q * t * nq * hd


def scoring_kind(pattern: str, i: int) -> str:
    """Kind of the layer that scores a stage before layer i (as `NemotronHForCausalLM.scoring_layer`)."""
    mixers = [j for j, c in enumerate(pattern) if c in (MAMBA, ATTENTION)]
    later = [j for j in mixers if j >= i]
    return pattern[later[0] if later else mixers[-1]]


def flop_model(cfg: LMConfig, t_full: int, plan=None, num_query: int = 0, *, scoring: bool = True) -> float:
    """FLOPs of a prefill of t_full tokens (layers + last-position head), under `plan` if given."""
    num_visual = plan.num_visual if plan is not None else 0
    stages = dict(plan.stages) if plan is not None else {}
    total, t = 0.0, t_full
    for i, kind in enumerate(cfg.pattern):
        if i in stages:
            if scoring and plan.selector == "score":
                total += scoring_flops(cfg, scoring_kind(cfg.pattern, i), t, num_visual, num_query, plan.scorer)
            t -= num_visual - stages[i]
            num_visual = stages[i]
        total += layer_flops(cfg, kind, t)
    return total + 2.0 * cfg.hidden_size * cfg.vocab_size


# ----------------------------------------------------------------------------- plans and inputs


def make_plans(shape: str, num_layers: int, num_visual: int, budget: float, *, scorer: ScoreConfig,
               fastv_layer: int, layers=None):
    """The plan of `shape` at `budget` (`reduction.plan.named`; PlanError if the schedule
    cannot reach it). layers: None (stages anywhere) or the allowed stage layers (snapped to)."""
    if shape not in SHAPES:
        raise cli.UsageError(f"--shapes: unknown plan {shape!r}; use {SHAPES}")
    return rp.named(shape, num_layers, num_visual, budget, scorer=scorer, layer=fastv_layer, layers=layers)


def video_prompt(d: int, prefix: int, num_visual: int, question: int, *, seed: int = 0, dtype=jnp.float32):
    """inputs_embeds (1, T, d), attention_mask (1, T), visual mask (1, T): prefix, video, question."""
    t = prefix + num_visual + question
    embeds = jax.random.normal(jax.random.key(seed), (1, t, d), dtype)
    visual = np.zeros((1, t), bool)
    visual[:, prefix:prefix + num_visual] = True
    return embeds, jnp.ones((1, t), bool), jnp.asarray(visual)


def make_prefill(graphdef, plan):
    """(state, embeds, mask, visual) -> last-position logits (1, vocab), `plan` static."""

    def prefill(state, embeds, mask, visual):
        model = nnx.merge(graphdef, state)
        h, _ = model.run_layers(embeds, Layout.prompt(mask), reduction=plan, visual=visual if plan else None)
        return model.logits(h[:, -1:])[:, 0]

    return prefill


# ----------------------------------------------------------------------------- benchmark


def benchmark(cfg: LMConfig, *, prefix: int, num_visual: int, question: int, budgets, shapes, repeats: int,
              max_query: int | None = None, fastv_layer: int = 2, overhead: bool = True, seed: int = 0,
              stage_kinds: str = "", on_row=None) -> dict:
    """Times the full prefill and every (shape, budget) plan; returns dict(full=..., rows=[...])."""
    model = NemotronHForCausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    embeds, mask, visual = video_prompt(cfg.hidden_size, prefix, num_visual, question, seed=seed + 1)
    args = (state, embeds, mask, visual)
    t_total = embeds.shape[1]
    num_query = question if max_query is None else max_query
    scorer = ScoreConfig(max_query=num_query) if num_query else ScoreConfig()
    num_query = scorer.max_query
    L = cfg.num_layers
    layers = rp.layers_of_kind(cfg.pattern, stage_kinds) if stage_kinds else None

    full_s, full_compile = timed(make_prefill(graphdef, None), args, repeats)
    full_flops = flop_model(cfg, t_total)
    full = dict(seconds=full_s, compile_seconds=full_compile, tokens=t_total, tokens_per_s=t_total / full_s,
                flops=full_flops, gflops_per_s=full_flops / full_s / 1e9)
    on_row and on_row(dict(full=full))

    rows = []
    for budget in budgets:
        for shape in shapes:
            row = dict(shape=shape, budget=float(budget), plan=None, achieved_budget=None, seconds=None)
            try:
                plan = make_plans(shape, L, num_visual, float(budget), scorer=scorer, fastv_layer=fastv_layer,
                                  layers=layers)
                row.update(plan=plan.name, selector=plan.selector, stages=[list(s) for s in plan.stages],
                           achieved_budget=plan.achieved_budget)
                flops = flop_model(cfg, t_total, plan, num_query)
                row["ideal_speedup"] = full_flops / flops
                row["ideal_speedup_no_scoring"] = full_flops / flop_model(cfg, t_total, plan, num_query,
                                                                          scoring=False)
                row["scoring_flops_fraction"] = 1.0 - flop_model(cfg, t_total, plan, num_query,
                                                                 scoring=False) / flops
                s, c = timed(make_prefill(graphdef, plan), args, repeats)
                row.update(seconds=s, compile_seconds=c, speedup=full_s / s, tokens_per_s=t_total / s)
                row["unscored_seconds"] = row["scoring_overhead"] = None
                if overhead and plan.selector == "score":
                    twin = dataclasses.replace(plan, selector="random", name=plan.name + "-unscored")
                    su, _ = timed(make_prefill(graphdef, twin), args, repeats)
                    row.update(unscored_seconds=su, scoring_overhead=(s - su) / s)
            except Exception as e:  # recorded, not fatal (PlanError, out of memory, ...)
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            rows.append(row)
            on_row and on_row(row)
    return dict(full=full, rows=rows, num_query=num_query, t_total=t_total)


HEADER = (f"{'plan':<22}{'budget':>7}{'achieved':>9}{'time (s)':>10}{'speedup':>9}{'ideal':>8}"
          f"{'no-score (s)':>13}{'overhead':>9}  stages")


def format_full(full) -> str:
    return (f"{'full (no reduction)':<22}{'1.00':>7}{'1.000':>9}{full['seconds']:>10.3f}{'1.00x':>9}{'1.00x':>8}"
            f"{'':>13}{'':>9}  {full['tokens']} tokens, {full['tokens_per_s']:.0f} tok/s, "
            f"{full['gflops_per_s']:.1f} GFLOP/s (model), compile {full['compile_seconds']:.1f}s")


def format_row(r) -> str:
    label = r["plan"] or r["shape"]
    lead = f"{label:<22}{r['budget']:>7.2f}"
    if "error" in r:
        return lead + f"{'':>9}{'failed':>10}  {r['error']}"
    over = "" if r.get("scoring_overhead") is None else f"{100 * r['scoring_overhead']:.1f}%"
    uni = "" if r.get("unscored_seconds") is None else f"{r['unscored_seconds']:.3f}"
    stages = " ".join(f"L{l}:{k}" for l, k in r["stages"])
    return (lead + f"{r['achieved_budget']:>9.3f}{r['seconds']:>10.3f}{r['speedup']:>8.2f}x"
            f"{r['ideal_speedup']:>7.2f}x{uni:>13}{over:>9}  {stages}")


def print_row(r):
    print(format_full(r["full"]) if "full" in r else format_row(r), flush=True)


def machine_info() -> dict:
    dev = jax.devices()[0]
    return dict(backend=jax.default_backend(), device=dev.device_kind, num_devices=jax.device_count(),
                cpu_count=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
                python=platform.python_version(), jax=jax.__version__)


def parse_budgets(values) -> list[float]:
    """--budgets values as floats in (0, 1] (UsageError naming the bad one)."""
    budgets = []
    for v in values:
        try:
            b = float(v)
        except ValueError:
            raise cli.UsageError(f"--budgets: {v!r} is not a number") from None
        cli_checks.in_range("--budgets", b, 0.0, 1.0, low_open=True)
        budgets.append(b)
    cli_checks.require(bool(budgets), "--budgets", "needs at least one budget")
    return budgets


def parse_shapes(values) -> list[str]:
    shapes = [s.strip() for s in values]
    for s in shapes:
        cli_checks.require(s in SHAPES, "--shapes", f"unknown plan {s!r}; use {', '.join(SHAPES)}")
    cli_checks.require(bool(shapes), "--shapes", "needs at least one plan")
    return shapes


def lm_config(model_kw) -> LMConfig:
    """The benchmark LM's config (UsageError naming --config for an invalid field)."""
    try:
        return LMConfig(**model_kw)
    except (ConfigError, TypeError, ValueError) as e:  # TypeError: a field LMConfig does not have
        raise cli.UsageError(f"--config: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    F = flags.FLAGS
    cfgd = F.config
    model_kw = dict(cfgd.model)
    bench = dict(cfgd.get("bench", {}) or {})
    repeats = F.repeats
    if F.runlocal:
        model_kw.update(RUNLOCAL_MODEL)
        bench.update(RUNLOCAL_BENCH)
        repeats = 1
    prefix = F.prefix if F.prefix is not None else bench.get("prefix", 16)
    num_visual = F.num_visual if F.num_visual is not None else bench.get("num_visual", 8192)
    question = F.question if F.question is not None else bench.get("question", 32)
    # Everything is checked before the model is built.
    cfg = lm_config(model_kw)
    shapes = parse_shapes(F.shapes)
    budgets = parse_budgets(F.budgets)
    cli_checks.at_least("--config.bench.prefix", prefix, 0)
    cli_checks.at_least("--config.bench.num_visual", num_visual, 1)
    cli_checks.at_least("--config.bench.question", question, 1)
    if set(shapes) & {"fastv", "uniform", "random"}:
        cli_checks.require(F.fastv_layer < cfg.num_layers, "--fastv_layer",
                           f"must be < the model's {cfg.num_layers} layers, got {F.fastv_layer}")
    bad = sorted(set(F.stage_kinds) - set(LAYER_CHARS))
    cli_checks.require(not bad, "--stage_kinds", f"unknown layer kinds {bad}; use chars of {''.join(LAYER_CHARS)!r}")
    if F.stage_kinds:
        cli_checks.require(bool(rp.layers_of_kind(cfg.pattern, F.stage_kinds)), "--stage_kinds",
                           f"no layer of kinds {F.stage_kinds!r} in the pattern {cfg.pattern}")
    if F.json:
        cli_checks.output_file("--json", F.json)
    info = machine_info()
    print(f"backend={info['backend']} device={info['device']} cpus={info['cpu_count']} "
          f"layers={cfg.num_layers} pattern={cfg.pattern} hidden={cfg.hidden_size} "
          f"prompt={prefix}+{num_visual}v+{question} repeats={repeats} "
          f"stage_kinds={F.stage_kinds or 'any'}")
    print(HEADER, flush=True)
    t0 = time.perf_counter()
    res = benchmark(cfg, prefix=prefix, num_visual=num_visual, question=question, budgets=budgets, shapes=shapes,
                    repeats=repeats, max_query=F.max_query, fastv_layer=F.fastv_layer,
                    overhead=F.overhead, seed=int(cfgd.get("seed", 0)),
                    stage_kinds=F.stage_kinds, on_row=print_row)
    wall = time.perf_counter() - t0
    print(f"wall time {wall:.1f}s; scoring uses max_query={res['num_query']} query rows; "
          f"ideal = FLOP-model speedup incl. scoring; overhead = (t_score - t_random) / t_score")
    if F.json:
        atomic.write_json(F.json, dict(machine=info, config=cfg.to_dict(),
                                       prompt=dict(prefix=prefix, num_visual=num_visual, question=question),
                                       repeats=repeats, budgets=budgets, shapes=shapes, stage_kinds=F.stage_kinds,
                                       wall_seconds=wall, **res), default=float)


if __name__ == "__main__":
    cli.run(main, define_flags)
