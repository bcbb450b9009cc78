"""Data specs of a finetuning config -> record sources for the grain pipelines.

A spec names where questions come from:

    "synth"              SynthVideoQA generated on the fly (`hybridvlm.data.synth`), from
                         the run's seed (train and validation splits differ)
    "synth:DIR"          a split prepared under DIR by `python -m hybridvlm.data.prepare_synth`
    "jsonl:FILE"         the local JSONL format (`hybridvlm.data.jsonl`)
    "<benchmark>:DIR"    a long-video benchmark reader (`hybridvlm.data.readers.BENCHMARKS`)

`parse_spec` checks a spec without reading anything (for the command line's early checks);
`source` opens it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from hybridvlm.data import synth
from hybridvlm.data.readers import BENCHMARKS, read_benchmark
from hybridvlm.data.records import VideoQARecord
from hybridvlm.data.synth_tfds import synth_source

KINDS = ("synth",) + tuple(BENCHMARKS)  # BENCHMARKS includes "jsonl"


class DataSpecError(ValueError):
    """A data spec that cannot be used; the message names the config field."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """kind: "synth", "jsonl" or a benchmark name; path: its file or directory (None for
    generated SynthVideoQA)."""

    kind: str
    path: str | None = None


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def parse_spec(spec: str, field: str) -> DataSpec:
    """DataSpec of `spec`; DataSpecError naming `field` (e.g. "--config.data.train") when
    the kind is unknown or its path is missing."""
    kind, sep, path = spec.partition(":")
    kind = kind.strip()
    if not sep:
        if _key(kind) != "synth":
            raise DataSpecError(f"{field}={spec!r}: give \"synth\" or KIND:PATH with KIND one of {', '.join(KINDS)}")
        return DataSpec("synth")
    known = {_key(k): k for k in KINDS}
    if _key(kind) not in known:
        raise DataSpecError(f"{field}={spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    kind = known[_key(kind)]
    if not path:
        raise DataSpecError(f"{field}={spec!r}: {kind} needs a path after the colon")
    if not os.path.exists(path):
        raise DataSpecError(f"{field}: {path}: no such file or directory")
    want_file = kind == "jsonl"
    if want_file and not os.path.isfile(path):
        raise DataSpecError(f"{field}: {path}: is not a file (jsonl:FILE)")
    if not want_file and not os.path.isdir(path):
        raise DataSpecError(f"{field}: {path}: is not a directory ({kind}:DIR)")
    return DataSpec(kind, path)


def source(spec: DataSpec, split: str, *, seed: int, num_examples: int, num_frames: int,
           frame_size: int, distractors: float = 1.0, tasks: Sequence[str] | None = None,
           turns: int = 0) -> Sequence[VideoQARecord]:
    """A random-access sequence of records of `split` ("train" or "validation").

    Generated SynthVideoQA has `num_examples` records of the split's seed
    (`synth.split_seed(seed, split)`); a prepared one is the split of the variant
    (num_frames, frame_size, seed) under its directory. A JSONL file or benchmark is read
    whole (its own split; `split` is ignored); questions whose video is missing are left out
    by the reader. Generated SynthVideoQA only (a curriculum): `distractors` < 1 blanks that
    share of the events that do not answer the question, `tasks` keeps those tasks (taken in
    turn; None: all four), `turns` > 0 puts up to that many question-answer turns before each
    question (`synth.turns_preamble`).
    """
    if (distractors < 1.0 or tasks or turns) and not (spec.kind == "synth" and spec.path is None):
        raise DataSpecError(f"distractors={distractors}, tasks={tasks}, turns={turns}: only generated SynthVideoQA "
                            f"(\"synth\") can blank distractor events, choose tasks or add turns, not {spec.kind}"
                            + (f":{spec.path}" if spec.path else ""))
    if spec.kind == "synth" and spec.path is None:
        return synth.SynthSource(synth.split_seed(seed, split), num_examples, num_frames, frame_size=frame_size,
                                 distractors=distractors, task=tuple(tasks) if tasks else None, turns=turns)
    if spec.kind == "synth":
        return synth_source(spec.path, split, num_frames, size=frame_size, base_seed=seed)
    return read_benchmark(spec.kind, spec.path).records
