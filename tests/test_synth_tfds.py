"""SynthVideoQA through TFDS (hybridvlm.data.synth_tfds) and its CLI
(python -m hybridvlm.data.prepare_synth): array_record files written and read back
exactly without TensorFlow, splits from disjoint seeds, nothing half-written left
behind, one-line CLI errors with exit status 2 for bad flags."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from hybridvlm import cli
from hybridvlm.data import prepare_synth, synth, synth_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"train": 4, "validation": 2, "test": 2}
FRAMES, SIZE = 16, 64


def run_cli(args: list[str]) -> int:
    """prepare_synth's __main__ path in this process; returns its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_argparse(prepare_synth.main, argv=args)
    return exit_info.value.code


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    """A data dir prepared by the CLI: 16 frames of 64x64, splits of 4 / 2 / 2."""
    data_dir = str(tmp_path_factory.mktemp("synth_data"))
    args = ["--data_dir", data_dir, "--frames", str(FRAMES), "--size", str(SIZE)]
    args += [x for split, n in SIZES.items() for x in (f"--{split}", str(n))]
    assert run_cli(args) == 0
    return data_dir


def _same(a, b) -> None:
    assert (a.uid, a.question, a.options, a.answer, a.task, a.instruction, a.preamble) == \
        (b.uid, b.question, b.options, b.answer, b.task, b.instruction, b.preamble)
    assert a.frames.dtype == b.frames.dtype and a.frames.shape == b.frames.shape
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.timestamps.dtype == b.timestamps.dtype and np.array_equal(a.timestamps, b.timestamps)
    assert a.meta.keys() == b.meta.keys()
    for key in a.meta:
        x, y = np.asarray(a.meta[key]), np.asarray(b.meta[key])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key


def test_round_trip_is_exact_and_needs_no_tensorflow(prepared):
    for split, n in SIZES.items():
        source = synth_tfds.synth_source(prepared, split, FRAMES, size=SIZE)
        generated = synth.SynthSource(synth.split_seed(0, split), n, FRAMES, frame_size=SIZE)
        assert len(source) == n
        for i in range(n):
            _same(source[i], generated[i])  # stored in index order
        assert source[-1].uid == generated[n - 1].uid
        with pytest.raises(IndexError):
            source[n]
    assert "tensorflow" not in sys.modules  # TFDS wrote and read array_record without it


def test_splits_hold_different_examples(prepared):
    frames = [synth_tfds.synth_source(prepared, s, FRAMES, size=SIZE)[0].frames.tobytes() for s in SIZES]
    assert len(set(frames)) == 3
    uids = {synth_tfds.synth_source(prepared, s, FRAMES, size=SIZE)[0].uid for s in SIZES}
    assert uids == {"synth/0/0", "synth/1/0", "synth/2/0"}


def test_source_pickles_without_its_open_files(prepared):
    source = synth_tfds.synth_source(prepared, "train", FRAMES, size=SIZE)
    record = source[1]  # opens the files
    copy = pickle.loads(pickle.dumps(source))
    assert copy._source is None
    _same(copy[1], record)


def test_layout_and_nothing_else_left_behind(prepared):
    assert os.listdir(prepared) == ["synth_video_qa"]  # no temporary or download directories
    path = synth_tfds.dataset_path(prepared, FRAMES, SIZE)
    assert path == os.path.join(prepared, "synth_video_qa", "frames16_size64", "1.0.0")
    files = sorted(os.listdir(path))
    assert [f for f in files if "array_record" in f] == [
        f"synth_video_qa-{s}.array_record-00000-of-00001" for s in ("test", "train", "validation")]


def test_missing_variant_or_split_is_named(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="frames32"):
        synth_tfds.synth_source(prepared, "train", 32)
    with pytest.raises(ValueError, match="dev"):
        synth_tfds.synth_source(prepared, "dev", FRAMES, size=SIZE)
    synth_tfds.prepare(str(tmp_path), FRAMES, size=16, split_sizes={"train": 1, "validation": 0, "test": 0})
    source = synth_tfds.synth_source(str(tmp_path), "test", FRAMES, size=16)
    with pytest.raises(ValueError, match="test"):
        len(source)


def test_a_failed_prepare_leaves_nothing(tmp_path, monkeypatch):
    real = synth.generate

    def fails_at_2(seed, index, **kwargs):
        if index == 2:
            raise RuntimeError("generator failed")
        return real(seed, index, **kwargs)

    monkeypatch.setattr(synth, "generate", fails_at_2)
    with pytest.raises(RuntimeError, match="generator failed"):
        synth_tfds.prepare(str(tmp_path), FRAMES, size=16, split_sizes={"train": 4, "validation": 0, "test": 0})
    leftovers = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert leftovers == []
    assert not os.path.exists(synth_tfds.dataset_path(str(tmp_path), FRAMES, 16))
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".prepare_synth")]


def test_configs():
    assert [c.name for c in synth_tfds.SynthVideoQA.BUILDER_CONFIGS] == [
        "frames16", "frames32", "frames64", "frames128", "frames256"]
    assert synth_tfds.make_config(32) is synth_tfds.SynthVideoQA.builder_configs["frames32"]
    assert synth_tfds.make_config(32).size == 128
    custom = synth_tfds.make_config(16, 64, base_seed=7)
    assert (custom.name, custom.num_frames, custom.size, custom.base_seed) == ("frames16_size64_seed7", 16, 64, 7)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, words", [
    (["--frames", "8"], ["--frames", "[16, 256]", "8"]),
    (["--frames", "257"], ["--frames", "257"]),
    (["--frames", "many"], ["--frames", "many"]),
    (["--train", "-1"], ["--train", ">= 0", "-1"]),
    (["--train", "0", "--validation", "0", "--test", "0"], ["--train/--validation/--test", "nothing"]),
    (["--size", "8"], ["--size", ">= 16"]),
    (["--seed", "-3"], ["--seed", "-3"]),
    (["--bogus", "1"], ["--bogus"]),
])
def test_bad_flag_values_are_one_line_and_exit_2(args, words, tmp_path, capsys):
    data_dir = str(tmp_path / "d")
    assert run_cli(["--data_dir", data_dir, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err
    assert not os.path.exists(data_dir)  # checked before anything is written


def test_unusable_data_dir_and_existing_variant_exit_1(prepared, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert run_cli(["--data_dir", str(a_file), "--frames", "16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data_dir" in err and "not a directory" in err
    assert run_cli(["--data_dir", prepared, "--frames", str(FRAMES), "--size", str(SIZE)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data_dir" in err and "already exists" in err


def test_help_exits_0_and_debug_raises(tmp_path, capsys):
    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"--{flag}" in out for flag in ("data_dir", "frames", "train", "validation", "test", "size", "debug"))
    with pytest.raises(cli.UsageError, match="--frames"):
        cli.run_argparse(prepare_synth.main, argv=["--data_dir", str(tmp_path), "--frames", "8", "--debug"])


def test_python_m_bad_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hybridvlm.data.prepare_synth", "--data_dir", str(tmp_path / "d"),
                           "--frames", "300"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: --frames: must be in [16, 256], got 300\n"
