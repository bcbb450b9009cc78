"""Every command the README shows runs, so none can rot.

Commands are read from README.md: every line of its ```bash blocks (segments
joined by `&&` split apart) and every inline `python ...` span of the prose.
Each `python -m MODULE ...` runs as a real process from the repository root,
with its module's entry of COMMANDS applied: flag values set (replacing the
README's, e.g. the benchmarks' long length lists) and flags added, so that it
finishes in seconds. A README command whose module has no entry FAILS the
test: adding one is a one-line entry. Placeholder paths (DIR, LM_DIR,
clip.mp4, out.json) become tiny generated fixtures; outputs go to a temporary
directory, never into the source tree.

Not run, by design (each matched on the command or block content below):
  - environment setup: `python3 -m venv`, `. .venv/bin/activate`, `pip install`
    (.ci/run runs those in a fresh virtualenv);
  - `python -m pytest`: the test suite itself (CI runs it);
  - the golden-fixture regeneration block (tests/fixtures/make_*.py): it
    needs torch and transformers, which the project never installs.
The ```python blocks use placeholder checkpoint paths and chain into each
other; they are compiled, and every project name they use is checked to exist.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from test_demo import word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PROJECT_PACKAGES = ("hybridvlm", "reduction", "eval", "configs", "train")


@dataclass(frozen=True)
class Tiny:
    """How the README commands of one module run here: `set` replaces (or adds) flag values,
    `add` appends flags; values may name fixtures as {vlm_ckpt}, {lm_ckpt}, {lm_hf}, {clip},
    {new_dir}, {new_file} (see `Fixtures`). `skip` gives the reason a module is never run."""

    set: dict = field(default_factory=dict)
    add: tuple = ()
    skip: str | None = None


# One entry per module a README command runs ("MODULE --flag" for a command with that flag). A new
# README command of a new module fails test_readme_command until it has an entry here.
COMMANDS = {
    "eval.demo": Tiny(set={"--config.max_new_tokens": "2"}),
    "eval.analyze": Tiny(set={"--num_examples": "1", "--config.max_frames": "4", "--config.max_new_tokens": "2"}),
    "eval.bench_prefill": Tiny(set={"--repeats": "1", "--budgets": "0.5", "--shapes": "fastv", "--num_visual": "64",
                                    "--prefix": "4", "--question": "8"}, add=("--runlocal", "--nooverhead")),
    "eval.bench_ssd": Tiny(set={"--lengths": "64", "--repeats": "1", "--heads": "2", "--head_dim": "8", "--state": "8",
                                "--groups": "1", "--chunk": "16", "--impls": "chunked", "--modes": "fwd"}),
    "eval.bench_memory": Tiny(set={"--frames": "4"}, add=("--runlocal",)),
    "eval.bench_context": Tiny(set={"--frames": "4", "--degrees": "1,2", "--fake_devices": "true", "--wall": "false"},
                               add=("--runlocal",)),
    "hybridvlm.convert": Tiny(set={"--hf": "{lm_hf}", "--out": "{new_dir}"}),
    "hybridvlm.convert --to-hf": Tiny(set={"--checkpoint": "{lm_ckpt}", "--out": "{new_dir}"}),
    "hybridvlm.data.prepare_synth": Tiny(set={"--data_dir": "{new_dir}", "--frames": "16", "--train": "2",
                                              "--validation": "1", "--test": "1"}),
    "eval.bench_data": Tiny(add=("--runlocal",)),
    "train.aot": Tiny(set={"--model": "tiny", "--devices": "8", "--mesh.data": "1", "--mesh.fsdp": "4",
                           "--mesh.tensor": "2", "--frames": "4", "--image_size": "64", "--layers": "2",
                           "--vision_layers": "1", "--text_tokens": "16", "--frame_text_tokens": "4"}),
    "train.finetune": Tiny(set={"--workdir": "{new_dir}", "--config.steps": "2", "--config.batch_size": "2",
                                "--config.optim.warmup_steps": "1", "--config.data.eval_examples": "2",
                                "--config.eval_every": "2", "--config.checkpoint_every": "1",
                                "--config.model.text.pattern": "M*-", "--config.model.vision.num_layers": "1",
                                "--config.compute_dtype": "float32"}),
    "train.pretrain_vision": Tiny(set={"--workdir": "{new_dir}", "--steps": "2", "--batch_size": "1",
                                       "--eval_examples": "1", "--log_every": "1"}),
    "eval.videoqa": Tiny(set={"--checkpoint": "{svqa_ckpt}", "--num_examples": "2", "--frames": "16",
                              "--batch_size": "2", "--plans": "progressive", "--budgets": "0.5",
                              "--greedy_batches": "0", "--json": "{new_file}", "--plot": "{new_png}"}),
    "eval.findings": Tiny(set={"--analysis": "{analysis_report}", "--videoqa": "{qa_report}",
                               "--finetuned": "{qa_report}", "--json": "{new_file}", "--markdown": "{new_md}"}),
    "pytest": Tiny(skip="the test suite itself: CI runs it"),
}

# Placeholder values of path flags in README commands -> fixtures.
PLACEHOLDERS = {
    ("--checkpoint", "DIR"): "{vlm_ckpt}",
    ("--checkpoint", "LM_DIR"): "{lm_ckpt}",
    ("--video", "clip.mp4"): "{clip}",
    ("--json", "out.json"): "{new_file}",
    ("--plot", "out.png"): "{new_png}",
}
# Flags naming files or directories: their README values must be placeholders above (or set by
# COMMANDS), so a command never reads a path that does not exist or writes into the source tree.
PATH_FLAGS = ("--checkpoint", "--video", "--image", "--hf", "--out", "--json", "--plot", "--clip_out", "--data_dir",
              "--workdir", "--analysis", "--videoqa", "--finetuned", "--markdown")

# Shell segments that set up the environment (CI does that) rather than run the project.
SETUP = re.compile(r"^(python3? -m venv |\. |source |pip |python -m pip )")
# The golden-fixture regeneration block: needs torch + transformers (never installed here).
FIXTURE_REGENERATION = re.compile(r"tests/fixtures/make_\w+\.py")


# ----------------------------------------------------------------------------- README parsing


def fenced_blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, first line number) of every ``` block."""
    blocks, lang, body, start = [], None, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip() or "text", [], n + 1
            else:
                blocks.append((lang, "\n".join(body), start))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: unclosed ``` block from line {start - 1}"
    return blocks


def inline_commands(text: str) -> list[tuple[str, int]]:
    """`python ...` spans in the prose (outside ``` blocks), with their line numbers."""
    out, inside = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            out += [(m.group(1), n) for m in re.finditer(r"`(python3? [^`]+)`", line)]
    return out


def readme_commands() -> list[tuple[str, str]]:
    """(command, where) for every command the README shows, minus the documented exclusions."""
    text = open(README).read()
    found = []
    for lang, body, start in fenced_blocks(text):
        if lang not in ("bash", "sh", "shell") or FIXTURE_REGENERATION.search(body):
            continue
        for offset, line in enumerate(body.replace("\\\n", " ").splitlines()):
            line = line.split(" #", 1)[0].strip()  # comments ("  # any config field")
            found += [(seg.strip(), f"README.md:{start + offset}") for seg in line.split("&&") if seg.strip()]
    found += [(cmd, f"README.md:{n}") for cmd, n in inline_commands(text)]
    return [(cmd, where) for cmd, where in found if not SETUP.match(cmd)]


def module_of(args: list[str]) -> tuple[str, list[str]]:
    """("eval.demo", rest) for `python -m eval.demo ...`; (path, rest) for `python path.py ...`."""
    assert args[0] in ("python", "python3"), f"not a python command: {shlex.join(args)}"
    if args[1] == "-m":
        return args[2], args[3:]
    return args[1], args[2:]


# ----------------------------------------------------------------------------- flags


def parse_flags(args: list[str]) -> list[list[str]]:
    """[[name, value] or [name]] from "--name=value", "--name value" and "--name" tokens.

    A token not starting with "-" after a flag is its value (README commands pass no
    positional arguments)."""
    out = []
    for tok in args:
        if tok.startswith("-"):
            out.append(tok.split("=", 1))
        else:
            assert out and len(out[-1]) == 1, f"positional argument {tok!r}: not supported here"
            out[-1].append(tok)
    return out


def set_flag(parsed: list[list[str]], name: str, value: str) -> list[list[str]]:
    """Replaces every occurrence of --name (both forms) with one --name=value, at the first one's place;
    an absent flag goes first (so a --config file precedes the command's --config.* overrides)."""
    at = next((i for i, f in enumerate(parsed) if f[0] == name), 0)
    rest = [f for f in parsed if f[0] != name]
    return rest[:at] + [[name, value]] + rest[at:]


def tiny_command(cmd: str) -> tuple[str, list[str]] | None:
    """(module, args with COMMANDS and PLACEHOLDERS applied, fixtures still as {names}); None if skipped."""
    module, args = module_of(shlex.split(cmd))
    assert module in COMMANDS, (
        f"README command {cmd!r}: module {module!r} has no entry in COMMANDS (tests/test_readme_commands.py); "
        "add one with the flags that make it run in seconds")
    # "MODULE --flag" entries: a mode of the module chosen by a flag of the command.
    tiny = next((COMMANDS[f"{module} {a}"] for a in args if f"{module} {a}" in COMMANDS), COMMANDS[module])
    if tiny.skip:
        return None
    parsed = parse_flags(args)
    for name, value in tiny.set.items():
        parsed = set_flag(parsed, name, value)
    for f in parsed:
        if f[0] in PATH_FLAGS and f[0] not in tiny.set:
            assert len(f) == 2 and (f[0], f[1]) in PLACEHOLDERS, (
                f"README command {cmd!r}: {'='.join(f)} is not a known placeholder; add it to PLACEHOLDERS")
            f[1] = PLACEHOLDERS[(f[0], f[1])]
    parsed += [[a] for a in tiny.add if [a] not in parsed]
    return module, ["=".join(f) for f in parsed]


def cases() -> list:
    """Unique tiny commands (two README commands that end up equal run once)."""
    seen, out = {}, []
    for cmd, where in readme_commands():
        try:
            tiny = tiny_command(cmd)
        except AssertionError as e:  # reported by the test, not at collection
            out.append(pytest.param(cmd, None, str(e), id=f"{where} {cmd}"))
            continue
        key = (tiny[0], tuple(sorted(tiny[1]))) if tiny else None  # the same flags in another order: the same run
        if tiny is None or key in seen:
            continue
        seen[key] = cmd
        out.append(pytest.param(cmd, tiny, None, id=f"{where} {cmd}"))
    return out


# ----------------------------------------------------------------------------- fixtures


class Fixtures:
    """Tiny stand-ins for the README's placeholders; {new_dir} / {new_file} are fresh per use."""

    def __init__(self, root):
        from flax import nnx
        from test_videoqa import tiny_config

        from hybridvlm.tokenizer import synth_tokenizer
        from hybridvlm.video import write_test_clip
        from hybridvlm.vlm import NemotronHVLModel
        from train.model import save_model, vlm_config

        self.root = root
        vlm, lm = root / "vlm_ckpt", root / "lm_ckpt"
        shutil.copytree(os.path.join(FIXTURES, "vlm", "omni_video"), vlm)
        word_tokenizer(vlm / "tokenizer.json", specials=(("<image>", 250), ("<img>", 251), ("</img>", 252)))
        shutil.copytree(os.path.join(FIXTURES, "nemotron_h", "hybrid_g2"), lm)
        word_tokenizer(lm / "tokenizer.json")
        clip = root / "clip.mp4"
        write_test_clip(str(clip), num_frames=12, fps=4)
        svqa = root / "svqa_ckpt"  # a tiny random VLM with the synth tokenizer (single-token letters)
        save_model(NemotronHVLModel(vlm_config(tiny_config().model), rngs=nnx.Rngs(0)), synth_tokenizer(), str(svqa))
        # Reports as eval.videoqa and eval.analyze write them (the fields eval.findings reads).
        row = lambda plan, budget, acc: dict(variant=plan if plan == "full" else f"{plan}@{budget:g}", plan=plan,
                                             budget=budget, mamba_mode=None if plan == "full" else "decay_free",
                                             evs=0.0, examples=8, accuracy=acc, achieved_budget=budget,
                                             prefill_speedup=1.0 if plan == "full" else 2.0)
        qa, analysis = root / "videoqa.json", root / "analysis.json"
        qa.write_text(json.dumps(dict(results=[row("full", 1.0, 0.5), row("progressive", 0.25, 0.5),
                                               row("fastv", 0.25, 0.25)])))
        analysis.write_text(json.dumps(dict(layers=[dict(layer=0, kind="M", sparsity_mean=0.4),
                                                    dict(layer=1, kind="*", sparsity_mean=0.7)],
                                            spearman=[[1.0, 0.3], [0.3, 1.0]], mass=0.9, num_examples=1)))
        self.paths = dict(vlm_ckpt=str(vlm), lm_ckpt=str(lm), lm_hf=str(lm), clip=str(clip), svqa_ckpt=str(svqa),
                          qa_report=str(qa), analysis_report=str(analysis))
        self._fresh = itertools.count()

    def fill(self, arg: str) -> str:
        n = next(self._fresh)
        return arg.format(**self.paths, new_dir=str(self.root / f"out{n}"), new_file=str(self.root / f"out{n}.json"),
                          new_png=str(self.root / f"out{n}.png"), new_md=str(self.root / f"out{n}.md"))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The commands' environment: one JAX persistent compilation cache for all of them. Each is a fresh
    process, and building a random model compiles every initializer shape anew (~15 s for the tiny
    VLM on 2 CPU cores); sharing the compilations keeps the whole file near a minute and a half."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


# ----------------------------------------------------------------------------- tests


def test_readme_has_commands():
    cmds = [c for c, _ in readme_commands()]
    assert any(c.startswith("python -m eval.demo") for c in cmds), cmds
    # The exclusions match what they claim to.
    text = open(README).read()
    assert any(FIXTURE_REGENERATION.search(b) for _, b, _ in fenced_blocks(text))


def test_tiny_commands_replace_flags_and_refuse_unknown_modules():
    module, args = tiny_command("python -m eval.bench_ssd --lengths 1024,4096,16384 --repeats=2 --max_seconds 20")
    assert module == "eval.bench_ssd" and "--lengths=64" in args and "--repeats=1" in args
    assert not any(a.startswith("--lengths=1024") or a == "--repeats=2" for a in args)
    assert args.index("--lengths=64") > args.index("--heads=2")  # replaced in place (absent ones go first)
    assert "--max_seconds=20" in args
    assert tiny_command("python -m eval.demo --checkpoint LM_DIR --question '...'")[1][-2:] == [
        "--checkpoint={lm_ckpt}", "--question=..."]
    assert tiny_command("python -m pytest -q tests") is None
    with pytest.raises(AssertionError, match="no entry in COMMANDS"):
        tiny_command("python -m eval.bench_newthing --repeats 3")
    with pytest.raises(AssertionError, match="not a known placeholder"):
        tiny_command("python -m eval.demo --video my_holiday.mp4")


@pytest.mark.parametrize("cmd,tiny,problem", cases())
def test_readme_command(cmd, tiny, problem, fixtures, env, tmp_path):
    assert problem is None, problem
    module, args = tiny
    args = [fixtures.fill(a) for a in args]
    before = set(os.listdir(ROOT))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(env, TMPDIR=str(tmp_path)), timeout=900)
    shown = f"README: {cmd}\nran: python -m {module} {shlex.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, shown
    assert "Traceback" not in proc.stderr and "Unable to initialize backend" not in proc.stdout + proc.stderr, shown
    assert set(os.listdir(ROOT)) <= before, f"wrote into the source tree: {set(os.listdir(ROOT)) - before}\n{shown}"
    for line in proc.stdout.splitlines():  # outputs the script reports (analyze: "output   : DIR")
        if line.startswith(("output", "wrote")):
            for path in re.findall(r"(/[^\s,:]+)", line):
                assert not path.startswith(ROOT + os.sep), shown


def test_readme_python_blocks_compile_and_name_real_things():
    """Compiled, and every project module, name and `module.attribute` they use exists."""
    blocks = [(b, n) for lang, b, n in fenced_blocks(open(README).read()) if lang == "python"]
    assert blocks
    for body, line in blocks:
        tree = ast.parse(body, f"README.md:{line}")
        compile(tree, f"README.md:{line}", "exec")
        modules = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in PROJECT_PACKAGES:
                        modules[a.asname or a.name] = importlib.import_module(a.name)
            elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in PROJECT_PACKAGES:
                mod = importlib.import_module(node.module)
                for a in node.names:
                    assert hasattr(mod, a.name), f"README.md:{line}: {node.module} has no {a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert hasattr(modules[node.value.id], node.attr), f"README.md:{line}: {node.value.id}.{node.attr}"
    # The README's python blocks chain: later ones use `hybridvlm` and `jnp` from the first.
    first = blocks[0][0]
    assert "import hybridvlm" in first and "import jax.numpy as jnp" in first
