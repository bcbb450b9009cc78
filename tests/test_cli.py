"""The command-line scripts' error handling (hybridvlm.cli): one line per expected error,
exit status 2 for usage errors and 1 for the rest, checked before any model is built;
`--debug` for the traceback; `--help` exits 0 and lists the config fields; no libtpu
probe line on CPU.

Each bad command line would cost a Python start with JAX imported (~4 s here), so
they run through one harness process (this file run as a script): it imports the
scripts once, then forks a child per command line, which runs the script as
`python -m` would (`runpy.run_module(..., run_name="__main__")`) with stdout and
stderr captured. Building a model in a child ends it with exit status 97 (the LM's
and VLM's constructors are patched), so "validated before the model is built" is checked, not
timed. Two checks also run as real `python -m` processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_demo import word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
LM_FIXTURE = os.path.join(FIXTURES, "nemotron_h", "hybrid_g2")
SCRIPTS = ("eval.demo", "eval.analyze", "eval.bench_prefill", "eval.bench_ssd", "eval.videoqa", "eval.findings",
           "hybridvlm.convert")
MODEL_BUILT = 97
TPU_PROBE = "Unable to initialize backend"


# ----------------------------------------------------------------------------- harness (child side)


def _harness(cases: list[dict]) -> list[dict]:
    """Runs each {"module", "args"} in a forked child; returns {"rc", "stdout", "stderr"} per case."""
    import runpy
    import tempfile

    for module in SCRIPTS:  # the expensive imports, once
        __import__(module)
    from hybridvlm.lm import NemotronHForCausalLM
    from hybridvlm.vlm import NemotronHVLModel

    def built(*args, **kwargs):
        sys.stderr.write("MODEL BUILT\n")
        sys.stderr.flush()
        os._exit(MODEL_BUILT)

    NemotronHForCausalLM.__init__ = NemotronHVLModel.__init__ = built
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child: run the script as __main__, exit with its status
                code = 1
                try:
                    for fd, path in ((1, out), (2, err)):
                        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                    sys.argv = ["python", *case["args"]]
                    sys.modules.pop(case["module"], None)  # runs afresh as __main__, as `python -m` would
                    runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                except BaseException:  # noqa: BLE001 -- an uncaught error: print it as Python would
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            results.append(dict(rc=os.waitstatus_to_exitcode(status), stdout=open(out).read(),
                                stderr=open(err).read()))
    return results


def run_cases(cases: list[dict], tmp_path) -> list[dict]:
    """The harness in a subprocess (cwd ROOT, TMPDIR tmp_path)."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(cases), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _python_m(module, *args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=dict(os.environ, TMPDIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> dict:
    """Bad inputs: paths of a missing, empty, corrupt, non-video file, a directory, checkpoints."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.mp4").write_bytes(b"")
    (d / "corrupt.mp4").write_bytes(bytes(range(256)) * 64)
    (d / "notes.txt").write_text("not a video\n" * 50)
    (d / "a_dir").mkdir()
    (d / "no_ckpt").mkdir()
    (d / "a_file").write_text("x")
    (d / "report.json").write_text('{"layers": [], "rows": []}')
    (d / "qa.json").write_text('{"results": [{"plan": "full", "budget": 1.0, "evs": 0.0, "examples": 4, '
                               '"accuracy": 0.5, "variant": "full"}]}')
    (d / "broken_config.py").write_text("def get_config(:\n")
    (d / "none_config.py").write_text("import ml_collections\n\n\ndef get_config():\n"
                                      "    c = ml_collections.ConfigDict()\n    c.fps = None\n    return c\n")
    shutil.copytree(LM_FIXTURE, d / "lm_no_tokenizer")
    shutil.copytree(LM_FIXTURE, d / "lm")
    word_tokenizer(d / "lm" / "tokenizer.json")
    names = ("empty.mp4", "corrupt.mp4", "notes.txt", "a_dir", "no_ckpt", "a_file", "lm_no_tokenizer", "lm",
             "broken_config.py", "none_config.py", "report.json", "qa.json")
    return {k: str(d / k) for k in names} | {"missing": str(d / "missing.mp4"), "dir": str(d)}


def bad_command_lines(b: dict) -> list[tuple[str, list[str], int, list[str]]]:
    """(module, args, exit status, words the one error line must contain)."""
    out = os.path.join(b["dir"], "videoqa.json")
    return [
        # videoqa: the model source and the report path, checked before loading
        ("eval.videoqa", [], 2, ["--checkpoint", "required"]),
        ("eval.videoqa", ["--checkpoint", b["missing"], "--json", out], 1,
         ["--checkpoint", b["missing"], "not the name of a shipped model"]),
        ("eval.videoqa", ["--checkpoint", b["no_ckpt"], "--json", out], 1, ["--checkpoint", "no checkpoint"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out], 2, ["--checkpoint", "text-only"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", b["a_dir"]], 1, ["--json", "directory"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out, "--plot", out], 2, ["--plot", ".png"]),
        ("eval.videoqa", ["--checkpoint", "no-such-model", "--json", out], 1, ["--checkpoint: no-such-model"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out, "--plans", "fastest"], 2, ["--plans", "fastest"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out, "--data", "youtube:abc"], 2, ["--data", "youtube"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out, "--budgets", "0.5,x"], 2, ["--budgets"]),
        ("eval.videoqa", ["--checkpoint", b["lm"], "--json", out, "--frames", "8"], 2, ["--frames", "8"]),
        # demo: paths (1)
        ("eval.demo", ["--video", b["missing"]], 1, ["--video", b["missing"], "no such file"]),
        ("eval.demo", ["--video", b["empty.mp4"]], 1, ["--video", b["empty.mp4"], "empty"]),
        ("eval.demo", ["--video", b["corrupt.mp4"]], 1, ["--video", b["corrupt.mp4"], "corrupt"]),
        ("eval.demo", ["--video", b["notes.txt"]], 1, ["--video", b["notes.txt"], "not a video"]),
        ("eval.demo", ["--video", b["a_dir"]], 1, ["--video", b["a_dir"], "directory"]),
        ("eval.demo", ["--image", b["corrupt.mp4"]], 1, ["--image", b["corrupt.mp4"]]),
        ("eval.demo", ["--checkpoint", b["no_ckpt"]], 1, ["--checkpoint", b["no_ckpt"], "no checkpoint"]),
        ("eval.demo", ["--checkpoint", b["missing"]], 1, ["--checkpoint", b["missing"], "no such directory"]),
        ("eval.demo", ["--checkpoint", b["lm_no_tokenizer"]], 1, ["--checkpoint", "tokenizer.json"]),
        ("eval.demo", ["--json", b["a_dir"]], 1, ["--json", b["a_dir"], "directory"]),
        ("eval.demo", ["--config", b["missing"] + ".py"], 1, ["--config", "no such file"]),
        ("eval.demo", ["--config", b["broken_config.py"]], 1, ["--config", "cannot load", "SyntaxError"]),
        # demo: usage (2)
        ("eval.demo", ["--config.foo=1"], 2, ["--config.foo", "unknown config field"]),
        ("eval.demo", ["--config.model.foo=1"], 2, ["--config.model.foo", "unknown config field"]),
        ("eval.demo", ["--config.max_frames=-1"], 2, ["--config.max_frames", ">= 1", "-1"]),
        ("eval.demo", ["--config.max_frames=abc"], 2, ["--config.max_frames", "abc"]),
        ("eval.demo", ["--config.fps=0"], 2, ["--config.fps", "> 0"]),
        ("eval.demo", ["--config", b["none_config.py"], "--config.fps=2.0"], 2,
         ["--config.fps", "None", "placeholder"]),
        ("eval.demo", ["--config.model.hidden_size=-4"], 2, ["--config", "hidden_size", "-4"]),
        ("eval.demo", ["--no_such_flag=3"], 2, ["--no_such_flag", "unknown flag"]),
        ("eval.demo", ["--video", b["missing"], "--image", b["missing"]], 2, ["--video", "--image"]),
        ("eval.demo", ["stray"], 2, ["unexpected arguments", "stray"]),
        ("eval.demo", ["--checkpoint", b["lm"], "--video", b["missing"]], 2, ["--checkpoint", "text-only"]),
        ("eval.analyze", ["--checkpoint", b["lm"]], 2, ["--checkpoint", "text-only"]),
        # analyze
        ("eval.analyze", ["--video", b["missing"]], 1, ["--video", b["missing"]]),
        ("eval.analyze", ["--out", b["a_file"]], 1, ["--out", b["a_file"], "not a directory"]),
        ("eval.analyze", ["--num_examples", "0"], 2, ["--num_examples"]),
        ("eval.analyze", ["--topk_frac", "1.5"], 2, ["--topk_frac", "1.5"]),
        # bench_prefill
        ("eval.bench_prefill", ["--budgets", "0.5,1.5"], 2, ["--budgets", "1.5"]),
        ("eval.bench_prefill", ["--budgets", "half"], 2, ["--budgets", "half"]),
        ("eval.bench_prefill", ["--shapes", "step,spiral"], 2, ["--shapes", "spiral"]),
        ("eval.bench_prefill", ["--repeats", "0"], 2, ["--repeats"]),
        ("eval.bench_prefill", ["--config.bench.nope=1"], 2, ["--config.bench.nope", "unknown config field"]),
        ("eval.bench_prefill", ["--config.model.n_groups=5"], 2, ["--config", "n_groups"]),
        # bench_ssd
        ("eval.bench_ssd", ["--lengths", "1024,lots"], 2, ["--lengths", "lots"]),
        ("eval.bench_ssd", ["--impls", "triton"], 2, ["--impls", "triton"]),
        ("eval.bench_ssd", ["--heads", "6", "--groups", "4"], 2, ["--groups", "--heads"]),
        ("eval.bench_ssd", ["--json", b["a_dir"]], 1, ["--json", b["a_dir"]]),
        # findings: reports are read and checked, nothing is run
        ("eval.findings", [], 2, ["--analysis", "--videoqa", "at least one"]),
        ("eval.findings", ["--videoqa", b["missing"]], 1, ["--videoqa", b["missing"], "no such file"]),
        ("eval.findings", ["--videoqa", b["notes.txt"]], 1, ["--videoqa", b["notes.txt"], "not JSON"]),
        ("eval.findings", ["--videoqa", b["report.json"]], 1, [b["report.json"], "no 'results'"]),
        ("eval.findings", ["--analysis", b["report.json"]], 1, [b["report.json"], "sparsity"]),
        ("eval.findings", ["--videoqa", b["qa.json"], "--finetuned", b["qa.json"]], 1,
         [b["qa.json"], "progressive@0.25"]),
        ("eval.findings", ["--videoqa", b["qa.json"], "--markdown", b["a_dir"]], 1, ["--markdown", "directory"]),
        # convert
        ("hybridvlm.convert", ["--hf", b["missing"], "--out", b["dir"] + "/o1"], 1, ["--hf", b["missing"]]),
        ("hybridvlm.convert", ["--hf", b["no_ckpt"], "--out", b["dir"] + "/o2"], 1, ["--hf", "no checkpoint"]),
        ("hybridvlm.convert", ["--hf", LM_FIXTURE, "--out", b["a_dir"]], 2, ["--out", b["a_dir"], "exists"]),
        ("hybridvlm.convert", ["--hf", LM_FIXTURE, "--out", b["dir"] + "/o3", "--dtype", "float77"], 2,
         ["--dtype", "float77"]),
        ("hybridvlm.convert", ["--hf", LM_FIXTURE, "--out", b["dir"] + "/o4", "--bogus"], 2, ["--bogus"]),
    ]


# ----------------------------------------------------------------------------- tests


# Good command lines: they pass every check and parse, so their run ends at the model build.
GOOD_COMMAND_LINES = [
    ("eval.demo", ["--config.fps=1.0", "--config.max_frames=16"]),  # fps: a typed placeholder
    ("eval.demo", ["--config", "configs/tiny_vlm.py", "--config.model.chunk_size=16", "--nodebug"]),
    ("eval.bench_prefill", ["--config=configs/tiny_lm.py", "--config.model.chunk_size=64", "--runlocal"]),
    ("eval.analyze", ["--config.max_frames=4", "--num_examples=1", "--mass=0.5"]),
]


def test_expected_errors_are_one_line_before_the_model_is_built(bad, tmp_path):
    lines = bad_command_lines(bad)
    debug = ("eval.demo", ["--video", bad["missing"], "--debug"])
    helps = [(m, ["--help"]) for m in SCRIPTS] + [("eval.bench_prefill", ["--config=configs/tiny_lm.py", "-h"])]
    cases = [dict(module=m, args=a) for m, a, _, _ in lines]
    cases += [dict(module=m, args=a) for m, a in GOOD_COMMAND_LINES + [debug] + helps]
    results = run_cases(cases, tmp_path)
    good, results = results[len(lines):len(lines) + len(GOOD_COMMAND_LINES)], \
        results[:len(lines)] + results[len(lines) + len(GOOD_COMMAND_LINES):]
    for (module, args), r in zip(GOOD_COMMAND_LINES, good):
        assert r["rc"] == MODEL_BUILT, f"python -m {module} {' '.join(args)}: exit {r['rc']}\n{r['stderr']}"

    for (module, args, status, words), r in zip(lines, results):
        cmd = f"python -m {module} {' '.join(args)}"
        assert r["rc"] != MODEL_BUILT, f"{cmd}: built the model before rejecting its input"
        assert r["rc"] == status, f"{cmd}: exit status {r['rc']}, expected {status}\n{r['stderr']}"
        err = r["stderr"].splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), f"{cmd}: stderr is not one error line:\n{r['stderr']}"
        for w in words:
            assert w in err[0], f"{cmd}: {w!r} not in {err[0]!r}"
        assert "Traceback" not in r["stdout"] + r["stderr"] and TPU_PROBE not in r["stdout"] + r["stderr"]

    r = results[len(lines)]
    assert r["rc"] == 1 and "Traceback (most recent call last)" in r["stderr"], r["stderr"]
    assert "InputError" in r["stderr"] and bad["missing"] in r["stderr"]

    for (module, args), r in zip(helps, results[len(lines) + 1:]):
        cmd = f"python -m {module} {' '.join(args)}"
        assert r["rc"] == 0 and not r["stderr"].strip(), f"{cmd}: exit {r['rc']}\n{r['stderr']}"
        assert "--debug" in r["stdout"], cmd
    help_of = {module: r["stdout"] for (module, args), r in zip(helps[:-1], results[len(lines) + 1:])}
    demo_help, prefill_help, tiny_help = help_of["eval.demo"], help_of["eval.bench_prefill"], results[-1]["stdout"]
    for field in ("--config.max_frames", "--config.fps", "--config.model.hidden_size", "--config.question"):
        assert field in demo_help, field
    fps = next(line.split() for line in demo_help.splitlines() if line.split()[:1] == ["--config.fps"])
    assert fps[1:] == ["float", "unset"], fps  # the typed placeholder
    assert "--config.bench.num_visual" in prefill_help and "--budgets" in prefill_help
    # --config names the file whose fields are listed.
    assert "tiny_lm.py" in tiny_help and "--config.bench.num_visual" not in tiny_help
    assert "--hf" in help_of["hybridvlm.convert"]
    assert all(f in help_of["eval.videoqa"] for f in ("--plans", "--budgets", "--evs", "--mamba_mode", "--plot"))


def test_python_m_error_and_libtpu_line(tmp_path):
    """A real `python -m` run: one line, exit status 2, and no libtpu probe line (it was an INFO log)."""
    r = _python_m("eval.demo", "--config.foo=1", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert "--config.foo" in r.stderr
    r = _python_m("eval.bench_ssd", "--lengths", "32", "--heads", "2", "--head_dim", "4", "--state", "4", "--groups",
                  "1", "--chunk", "16", "--impls", "chunked", "--modes", "fwd", "--repeats", "1", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "chunked" in r.stdout and TPU_PROBE not in r.stdout + r.stderr, r.stderr


def test_analyze_default_output_is_outside_the_source_tree(tmp_path, monkeypatch):
    from eval import analyze

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out_dir, json_path = analyze.output_paths(None, None)
    assert os.path.isdir(out_dir) and not os.path.abspath(out_dir).startswith(ROOT + os.sep)
    assert os.path.commonpath([out_dir, str(tmp_path)]) == str(tmp_path)
    assert json_path == os.path.join(out_dir, analyze.JSON_NAME)
    # --json names the directory; --out wins over both.
    json_path = str(tmp_path / "r" / "a.json")
    assert analyze.output_paths(None, json_path) == (str(tmp_path / "r"), json_path)
    assert analyze.output_paths("o", None) == ("o", os.path.join("o", analyze.JSON_NAME))


def test_error_classification():
    from absl import flags

    from hybridvlm import cli
    from hybridvlm.config import ConfigError
    from hybridvlm.video import VideoError

    assert cli.exit_status(cli.UsageError("x")) == 2
    assert cli.exit_status(flags.IllegalFlagValueError("x")) == 2
    for e in (cli.InputError("x"), FileNotFoundError(2, "No such file or directory", "f"), ConfigError("x"),
              VideoError("v.mp4", "corrupt")):
        assert cli.exit_status(e) == 1, e
    for e in (ValueError("x"), KeyError("k"), RuntimeError("x"), AssertionError()):
        assert cli.exit_status(e) is None, e  # bugs keep their traceback
    assert cli.describe(FileNotFoundError(2, "No such file or directory", "out/a.json")) == \
        "out/a.json: No such file or directory"
    assert cli.describe(ConfigError("LMConfig.x: bad\n  really")) == "LMConfig.x: bad really"
    assert cli.debug_requested(["p", "--debug"]) and cli.debug_requested(["p", "--debug=true"])
    assert not cli.debug_requested(["p", "--debug", "--nodebug"]) and not cli.debug_requested(["p", "--", "--debug"])


if __name__ == "__main__":  # the harness: JSON cases on stdin, JSON results on stdout
    cases = json.load(sys.stdin)
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # keep stray import-time output out of the JSON
    results = _harness(cases)
    os.write(real_stdout, json.dumps(results).encode())


def test_the_config_file_flag_moves_before_its_overrides():
    # config_flags refuses `--config.x=1 --config FILE`; the runner names the file first.
    from hybridvlm.cli import _without_flag

    args = ["--config.steps=2", "--config", "a.py", "--workdir", "w", "--config=b.py", "--", "--config", "c.py"]
    assert _without_flag(args, "config") == ["--config.steps=2", "--workdir", "w", "--", "--config", "c.py"]
