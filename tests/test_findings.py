"""eval.findings: each finding's verdict from hand-made reports whose answer is known by construction."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from eval import findings as fd

N = 400  # questions per variant: two standard errors of a difference at 50% are 7.1 points


def _row(plan, budget, acc, *, mode="decay_free", evs=0.0, n=N, kept=None, speedup=None):
    label = plan if plan == "full" else f"{plan}@{budget:g}" + ("/decay" if mode == "decay" else "")
    return dict(variant=label + (f"+evs{evs:g}" if evs else ""), plan=plan, budget=budget,
                mamba_mode=None if plan in ("full", "uniform", "random") else mode, evs=evs, examples=n,
                accuracy=acc, achieved_budget=budget if kept is None else kept, prefill_speedup=speedup)


def _qa(**acc):
    """A videoqa report: acc maps "plan@budget" (or "full", "progressive@0.25/decay", "...+evs0.5") -> accuracy."""
    rows = []
    for key, a in acc.items():
        key = key.replace("_", ".").replace("AT", "@").replace("SLASH", "/").replace("PLUS", "+")
        evs = float(key.split("+evs")[1]) if "+evs" in key else 0.0
        key = key.split("+evs")[0]
        mode = "decay" if key.endswith("/decay") else "decay_free"
        key = key.split("/")[0]
        plan, budget = (key, 1.0) if key == "full" else (key.split("@")[0], float(key.split("@")[1]))
        rows.append(_row(plan, budget, a, mode=mode, evs=evs, kept=budget * (1 - evs)))
    return dict(results=rows)


def test_noise_and_comparisons():
    assert math.isclose(fd.noise(0.5, 0.5, N), 2 * math.sqrt(0.25 * 2 / N))
    assert fd.compare(0.60, 0.50, N) == "win" and fd.compare(0.50, 0.60, N) == "loss"
    assert fd.compare(0.55, 0.50, N) == "tie"  # 5 points < 7.1
    assert fd.compare(0.55, 0.50, 10 * N) == "win"  # the same gap on 10x the questions
    assert fd.verdict(["win", "tie"]) == fd.REPRODUCED
    assert fd.verdict(["tie", "tie"]) == fd.verdict(["loss"]) == fd.NOT_REPRODUCED
    assert fd.verdict(["win", "loss"]) == fd.MIXED


def _by(rows):
    return {r["finding"]: r for r in rows}


def test_plan_comparisons_c_d_e():
    qa = {"full": 0.9, "progressiveAT0.25": 0.80, "progressiveAT0.5": 0.86,
          "fastvAT0.25": 0.60, "pyramidAT0.25": 0.65, "fastvAT0.5": 0.84, "pyramidAT0.5": 0.83,
          "progressiveAT0.25SLASHdecay": 0.70, "progressiveAT0.5SLASHdecay": 0.95,
          "uniformAT0.25": 0.81, "randomAT0.25": 0.50, "uniformAT0.5": 0.85, "randomAT0.5": 0.84}
    got = _by(fd.findings(videoqa=_qa(**{k.replace(".", "_"): v for k, v in qa.items()})))
    # c: beats the best one-shot plan at 0.25 (80 vs 65), ties at 0.5 (86 vs 84): reproduced.
    assert got["c"]["verdict"] == fd.REPRODUCED and "pyramid@0.25 65.0%" in got["c"]["evidence"]
    # d: wins at 0.25 (80 vs 70), loses at 0.5 (86 vs 95): mixed.
    assert got["d"]["verdict"] == fd.MIXED
    # e: against the better of uniform and random: ties at both budgets: not reproduced.
    assert got["e"]["verdict"] == fd.NOT_REPRODUCED and "uniform@0.25 81.0%" in got["e"]["evidence"]
    assert got["g"]["verdict"] == fd.UNMEASURED  # no EVS variants


def test_evs_composition_g():
    qa = _qa(full=0.9, progressiveAT0_25=0.80, progressiveAT0_5=0.85, fullPLUSevs0_5=0.88,
             progressiveAT0_25PLUSevs0_5=0.78, progressiveAT0_5PLUSevs0_5=0.70)
    g = _by(fd.findings(videoqa=qa))["g"]
    # keeps the plan's accuracy at 0.25 (78 vs 80, a tie), loses at 0.5 (70 vs 85): mixed.
    assert g["verdict"] == fd.MIXED and "EVS alone 88.0%" in g["evidence"] and "overall budget 0.12" in g["evidence"]
    qa = _qa(full=0.9, progressiveAT0_25=0.80, progressiveAT0_25PLUSevs0_5=0.79)
    assert _by(fd.findings(videoqa=qa))["g"]["verdict"] == fd.REPRODUCED


def test_finetuning_f_and_the_target():
    base = _qa(full=0.90, progressiveAT0_25=0.70)
    tuned = dict(results=[_row("full", 1.0, 0.91), _row("progressive", 0.25, 0.89, speedup=3.4)])
    f = _by(fd.findings(videoqa=base, finetuned=tuned))["f"]
    assert f["verdict"] == fd.REPRODUCED and f["target_met"] and "gap 2.0 points" in f["evidence"]
    tuned["results"][1].update(accuracy=0.72)
    f = _by(fd.findings(videoqa=base, finetuned=tuned))["f"]
    assert f["verdict"] == fd.NOT_REPRODUCED and not f["target_met"]
    tuned["results"][1].update(accuracy=0.89, prefill_speedup=2.5)  # accurate enough, not fast enough
    assert not _by(fd.findings(videoqa=base, finetuned=tuned))["f"]["target_met"]
    with pytest.raises(fd.ReportError, match="--videoqa"):
        fd.findings(finetuned=tuned)


def _analysis(sparsity, spearman):
    layers = [dict(layer=i, kind="M*-"[i % 3], sparsity_mean=s) for i, s in enumerate(sparsity)]
    return dict(layers=layers, spearman=spearman, overlap=[[0.5] * len(sparsity)] * len(sparsity), mass=0.9,
                num_examples=3, topk_frac=0.25)


def test_sparsity_a_and_instability_b():
    eye = lambda n, off: [[1.0 if i == j else off for j in range(n)] for i in range(n)]
    got = _by(fd.findings(analysis=_analysis([0.2, 0.3, None, 0.9], eye(4, 0.2))))
    assert got["a"]["verdict"] == fd.REPRODUCED and "2/3 scored layers" in got["a"]["evidence"]
    assert got["b"]["verdict"] == fd.REPRODUCED and "mean Spearman over 3 pairs" in got["b"]["evidence"]
    got = _by(fd.findings(analysis=_analysis([0.9, 0.8, 0.7], eye(3, 0.9))))
    assert got["a"]["verdict"] == fd.NOT_REPRODUCED and got["b"]["verdict"] == fd.NOT_REPRODUCED
    got = _by(fd.findings(analysis=_analysis([0.3, 0.8, 0.9], eye(3, 0.6))))
    assert got["a"]["verdict"] == fd.MIXED and got["b"]["verdict"] == fd.MIXED
    with pytest.raises(fd.ReportError, match="sparsity"):
        fd.findings(analysis=dict(layers=[]))


def test_cli_writes_json_and_markdown(tmp_path):
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps(_qa(full=0.9, progressiveAT0_25=0.8, fastvAT0_25=0.5)))
    out, md = tmp_path / "f.json", tmp_path / "f.md"
    p = subprocess.run([sys.executable, "-m", "eval.findings", "--videoqa", str(qa), "--json", str(out),
                        "--markdown", str(md)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = json.loads(out.read_text())["findings"]
    assert [r["finding"] for r in rows] == ["c", "d", "e", "g"] and rows[0]["verdict"] == fd.REPRODUCED
    text = md.read_text()
    assert text.startswith("| | Finding | Verdict | Evidence |") and "| (c) |" in text and "**reproduced**" in text
    assert "(c)     reproduced" in p.stdout
