"""The paper's findings, stated from the reports of `eval.analyze` and `eval.videoqa`.

    python -m eval.findings --analysis analysis.json --videoqa videoqa.json \\
        [--finetuned videoqa_ft.json] --json findings.json --markdown findings.md

Reads what the measuring tools wrote (nothing is re-run) and states each finding as
reproduced, not reproduced or mixed, with the numbers it rests on:

  a  layerwise sparsity: in most scored layers a minority of visual tokens holds 90% of
     the score mass (analysis: a layer is sparse when that share is <= SPARSE_SHARE);
  b  instability across depth: the visual tokens' importance ranking changes between
     layers (mean Spearman over pairs of scored layers < UNSTABLE_SPEARMAN; >=
     STABLE_SPEARMAN is "not reproduced");
  c  progressive (low-to-high) beats one-shot early pruning (FastV, PyramidDrop) at
     equal budget;
  d  the decay-free Mamba score beats the decayed one (progressive plan);
  e  language-aware scoring (progressive) beats uniform and random selection;
  f  finetuning under reduction recovers accuracy: progressive@0.25 of the finetuned
     model (--finetuned) against the same plan before finetuning; plus the project's
     target, progressive@0.25 within 3 points of `full` with a >= 3x prefill speedup;
  g  EVS before the LM composed with the progressive plan keeps the accuracy of the
     progressive plan alone (at each budget) while keeping fewer tokens.

Accuracy comparisons are per budget, between variants scored on the same questions: a
difference counts only beyond two standard errors of a difference of two accuracies
(`noise`); within it the budget is a tie. A finding of "A beats B" is reproduced when A
wins at some budget and loses at none, not reproduced when it wins at none, mixed when
it both wins and loses. The reports are checked first: a missing file, a file that is not
JSON, or a report without the variants a finding needs is named in one error line
(`--debug` for the traceback).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from absl import flags

from hybridvlm import atomic, cli, cli_checks

SPARSE_SHARE = 0.5  # a layer is sparse when <= half of its visual tokens hold 90% of the score mass
UNSTABLE_SPEARMAN = 0.5
STABLE_SPEARMAN = 0.8
TARGET_GAP = 0.03  # the project's target: progressive@0.25 within 3 points of full
TARGET_SPEEDUP = 3.0
REPRODUCED, NOT_REPRODUCED, MIXED, UNMEASURED = "reproduced", "not reproduced", "mixed", "not measured"


class ReportError(ValueError):
    """A report that lacks what a finding needs (the message names the file and the field)."""


def define_flags() -> None:
    flags.DEFINE_string("analysis", None, "analysis.json of `python -m eval.analyze` (findings a, b).")
    flags.DEFINE_string("videoqa", None, "JSON report of `python -m eval.videoqa` (findings c, d, e, g).")
    flags.DEFINE_string("finetuned", None, "JSON report of `eval.videoqa` on the model finetuned under "
                                           "reduction (finding f).")
    flags.DEFINE_string("json", None, "Where to write the findings (JSON).")
    flags.DEFINE_string("markdown", None, "Where to write the findings as a Markdown table.")


# ----------------------------------------------------------------------------- comparisons


def noise(p1: float, p2: float, n: int) -> float:
    """Two standard errors of the difference of two accuracies over n questions each."""
    p = (p1 + p2) / 2
    return 2.0 * math.sqrt(max(p * (1 - p), 1e-12) * 2.0 / max(n, 1))


def compare(a: float, b: float, n: int) -> str:
    """"win", "loss" or "tie" of accuracy a against b (n questions each)."""
    d = a - b
    if abs(d) <= noise(a, b, n):
        return "tie"
    return "win" if d > 0 else "loss"


def verdict(outcomes: Sequence[str]) -> str:
    """Reproduced (a win, no loss), not reproduced (no win) or mixed (wins and losses)."""
    wins, losses = outcomes.count("win"), outcomes.count("loss")
    if wins and not losses:
        return REPRODUCED
    if not wins:
        return NOT_REPRODUCED
    return MIXED


class Results:
    """Lookup of an `eval.videoqa` report's rows by (plan, budget, Mamba mode, EVS rate)."""

    def __init__(self, report: Mapping, path: str):
        if "results" not in report:
            raise ReportError(f"{path}: no 'results' (not an eval.videoqa report)")
        self.path = path
        self.rows = list(report["results"])

    def get(self, plan: str, budget: float | None = None, *, mode: str | None = "decay_free", evs: float = 0.0):
        for r in self.rows:
            if r["plan"] != plan or float(r.get("evs") or 0.0) != evs:
                continue
            if plan == "full" or ((budget is None or math.isclose(r["budget"], budget))
                                  and (r.get("mamba_mode") in (None, mode))):
                return r
        return None

    def budgets(self, plan: str = "progressive") -> list[float]:
        return sorted({r["budget"] for r in self.rows if r["plan"] == plan and not r.get("evs")})

    def need(self, plan: str, budget: float | None = None, **kw) -> dict:
        r = self.get(plan, budget, **kw)
        if r is None:
            what = plan if budget is None else f"{plan}@{budget:g}"
            raise ReportError(f"{self.path}: no result for {what} {kw or ''} (run eval.videoqa with it)")
        return r


def _acc(r) -> str:
    return f"{100 * r['accuracy']:.1f}%"


def beats(res: Results, name: str, claim: str, winner, losers) -> dict:
    """Finding "winner beats the best of losers" over the progressive plan's budgets.
    winner(budget) / losers(budget) -> result rows (None: not measured at that budget)."""
    outcomes, parts = [], []
    for b in res.budgets():
        w, ls = winner(b), [r for r in losers(b) if r is not None]
        if w is None or not ls:
            continue
        best = max(ls, key=lambda r: r["accuracy"])
        n = min(w["examples"], best["examples"])
        o = compare(w["accuracy"], best["accuracy"], n)
        outcomes.append(o)
        parts.append(f"@{b:g}: {w['variant']} {_acc(w)} vs {best['variant']} {_acc(best)} ({o}, n={n})")
    if not outcomes:
        return dict(finding=name, claim=claim, verdict=UNMEASURED, evidence="the report has none of these variants")
    return dict(finding=name, claim=claim, verdict=verdict(outcomes), evidence="; ".join(parts))


# ----------------------------------------------------------------------------- the findings


def sparsity_finding(analysis: Mapping, path: str) -> dict:
    layers = [l for l in analysis.get("layers", []) if l.get("sparsity_mean") is not None]
    if not layers:
        raise ReportError(f"{path}: no per-layer sparsity (not an eval.analyze report)")
    sparse = [l for l in layers if l["sparsity_mean"] <= SPARSE_SHARE]
    v = REPRODUCED if 2 * len(sparse) >= len(layers) else (NOT_REPRODUCED if not sparse else MIXED)
    shares = ", ".join(f"{l['layer']}{l['kind']} {l['sparsity_mean']:.2f}" for l in layers)
    return dict(finding="a", claim="visual-token importance is sparse in most layers", verdict=v,
                evidence=f"{len(sparse)}/{len(layers)} scored layers have <= {SPARSE_SHARE:.0%} of the visual "
                         f"tokens holding {analysis.get('mass', 0.9):.0%} of the score mass (share per layer: "
                         f"{shares}; {analysis.get('num_examples', '?')} examples)")


def instability_finding(analysis: Mapping, path: str) -> dict:
    layers = [l["layer"] for l in analysis.get("layers", []) if l.get("sparsity_mean") is not None]
    sp = analysis.get("spearman")
    if sp is None or len(layers) < 2:
        raise ReportError(f"{path}: no Spearman matrix over >= 2 scored layers")
    pairs = [sp[i][j] for k, i in enumerate(layers) for j in layers[k + 1:] if sp[i][j] is not None]
    if not pairs:
        raise ReportError(f"{path}: the Spearman matrix has no values between scored layers")
    mean = sum(pairs) / len(pairs)
    v = REPRODUCED if mean < UNSTABLE_SPEARMAN else (NOT_REPRODUCED if mean >= STABLE_SPEARMAN else MIXED)
    first, last = layers[0], layers[-1]
    ov = analysis.get("overlap")
    ov_txt = f"; top-{analysis.get('topk_frac', 0.25):.0%} overlap of layer {first} with layer {last}: " \
             f"{ov[first][last]:.2f}" if ov is not None and ov[first][last] is not None else ""
    return dict(finding="b", claim="visual-token importance changes across depth", verdict=v,
                evidence=f"mean Spearman over {len(pairs)} pairs of scored layers {mean:.2f} (min {min(pairs):.2f}, "
                         f"max {max(pairs):.2f}){ov_txt}")


def qa_findings(res: Results) -> list[dict]:
    out = [
        beats(res, "c", "progressive low-to-high pruning beats one-shot early pruning (FastV, PyramidDrop)",
              lambda b: res.get("progressive", b), lambda b: [res.get("fastv", b), res.get("pyramid", b)]),
        beats(res, "d", "the decay-free Mamba score beats the decayed one (progressive plan)",
              lambda b: res.get("progressive", b), lambda b: [res.get("progressive", b, mode="decay")]),
        beats(res, "e", "language-aware scoring beats uniform and random selection",
              lambda b: res.get("progressive", b), lambda b: [res.get("uniform", b), res.get("random", b)]),
    ]
    rates = sorted({float(r["evs"]) for r in res.rows if r.get("evs")})
    outcomes, parts = [], []
    for rate in rates:
        for b in res.budgets():
            combo, alone = res.get("progressive", b, evs=rate), res.get("progressive", b)
            if combo is None or alone is None:
                continue
            n = min(combo["examples"], alone["examples"])
            o = compare(combo["accuracy"], alone["accuracy"], n)
            outcomes.append("loss" if o == "loss" else "win")  # keeping accuracy (a tie) is the claim
            evs_alone = res.get("full", evs=rate)
            extra = f", EVS alone {_acc(evs_alone)}" if evs_alone else ""
            parts.append(f"@{b:g}+evs{rate:g}: {_acc(combo)} at overall budget {combo['achieved_budget']:.2f} vs "
                         f"progressive alone {_acc(alone)} at {alone['achieved_budget']:.2f}{extra} ({o}, n={n})")
    claim = "EVS composed with the progressive plan keeps the plan's accuracy with fewer tokens"
    out.append(dict(finding="g", claim=claim, verdict=verdict(outcomes) if outcomes else UNMEASURED,
                    evidence="; ".join(parts) if parts else "the report has no EVS variants (--evs)"))
    return out


def finetune_finding(base: Results, tuned: Results, budget: float = 0.25) -> dict:
    before, after = base.need("progressive", budget), tuned.need("progressive", budget)
    full = tuned.need("full")
    n = min(before["examples"], after["examples"])
    o = compare(after["accuracy"], before["accuracy"], n)
    gap = full["accuracy"] - after["accuracy"]
    speed = after.get("prefill_speedup")
    target = gap <= TARGET_GAP and speed is not None and speed >= TARGET_SPEEDUP
    return dict(finding="f", claim=f"finetuning under progressive@{budget:g} recovers accuracy",
                verdict=verdict([o]),
                evidence=f"progressive@{budget:g} {_acc(before)} before, {_acc(after)} after finetuning ({o}, n={n}); "
                         f"full {_acc(full)}: gap {100 * gap:.1f} points, prefill speedup "
                         f"{'?' if speed is None else f'{speed:.2f}x'} (target <= {100 * TARGET_GAP:.0f} points and "
                         f">= {TARGET_SPEEDUP:g}x: {'met' if target else 'not met'})",
                target_met=bool(target))


def findings(analysis=None, videoqa=None, finetuned=None, *, paths=("analysis", "videoqa", "finetuned")) -> list[dict]:
    """Every finding the given reports allow (dicts: finding, claim, verdict, evidence)."""
    out = []
    if analysis is not None:
        out += [sparsity_finding(analysis, paths[0]), instability_finding(analysis, paths[0])]
    base = Results(videoqa, paths[1]) if videoqa is not None else None
    if base is not None:
        out += qa_findings(base)
    if finetuned is not None:
        if base is None:
            raise ReportError(f"{paths[2]}: finding f compares against the model before finetuning: give --videoqa")
        out.append(finetune_finding(base, Results(finetuned, paths[2])))
    return sorted(out, key=lambda f: f["finding"])


def markdown(rows: Sequence[Mapping]) -> str:
    lines = ["| | Finding | Verdict | Evidence |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| ({r['finding']}) | {r['claim']} | **{r['verdict']}** | {r['evidence']} |")
    return "\n".join(lines) + "\n"


def _load(flag: str, path: str | None):
    if path is None:
        return None
    cli_checks.input_file(flag, path)
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise cli.InputError(f"{flag}: {path}: not JSON ({e})") from None


def main(argv) -> None:
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if f.analysis is None and f.videoqa is None:
        raise cli.UsageError("--analysis / --videoqa: give at least one report")
    for flag, path in (("--json", f.json), ("--markdown", f.markdown)):
        if path is not None:
            cli_checks.output_file(flag, path)
    reports = [_load(flag, getattr(f, flag[2:])) for flag in ("--analysis", "--videoqa", "--finetuned")]
    paths = tuple(str(getattr(f, k)) for k in ("analysis", "videoqa", "finetuned"))
    try:
        rows = findings(*reports, paths=paths)
    except ReportError as e:
        raise cli.InputError(str(e)) from None
    if f.json:
        atomic.write_json(f.json, dict(findings=rows, reports=dict(zip(("analysis", "videoqa", "finetuned"), paths))))
    if f.markdown:
        atomic.write_text(f.markdown, markdown(rows))
    for r in rows:
        print(f"({r['finding']}) {r['verdict']:>14}  {r['claim']}\n     {r['evidence']}")
    written = [p for p in (f.json, f.markdown) if p]
    if written:
        print("wrote " + " and ".join(written))


if __name__ == "__main__":
    cli.run(main, define_flags)
