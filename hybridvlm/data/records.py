"""One multiple-choice video question, whatever its source.

Every source (SynthVideoQA, the benchmark readers, the local JSONL format)
yields `VideoQARecord`s; the grain pipelines turn them into model batches.
A record holds either decoded frames (SynthVideoQA: generated in memory) or
the path of a video file (the benchmarks: decoded by the pipeline, so a
missing or unreadable file is found, reported and skipped there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LETTERS = "ABCDEFGHIJ"
# The instruction line of LongVideoBench and SynthVideoQA (and the default).
DEFAULT_INSTRUCTION = "Answer with the option's letter from the given choices directly."
DEFAULT_OPTION_FORMAT = "{letter}. {option}"


class RecordError(ValueError):
    """A record that cannot be a multiple-choice question; the message names the field."""


@dataclasses.dataclass(frozen=True)
class VideoQARecord:
    """A multiple-choice question about one video.

    Attributes:
      uid: unique id within its source (e.g. "videomme/001-1").
      question: the question text, without the options.
      options: the option texts, without letter prefixes ("red", not "A. red").
      answer: index of the correct option, or None where the split hides it.
      task: the question's category ("color", "Counting Problem", ...), or "".
      video: path of the video file, or None when `frames` are given.
      frames: (T, H, W, 3) uint8 RGB frames, or None when `video` is given.
      timestamps: (T,) seconds of `frames` (None with `video`: the reader's
        sampled times are used).
      preamble: text placed before the question (e.g. Video-MME's instruction), or "".
      instruction: the line after the options.
      option_format: how one option line is written, from `letter` and
        `option` ("{letter}. {option}": "A. red"; LVBench and MLVU write "(A) red").
      options_header: a line before the options (MLVU: "Options:"), or "".
      meta: source-specific ground truth and fields (JSON-serialisable values,
        or numpy arrays for SynthVideoQA's per-frame truth).
    """

    uid: str
    question: str
    options: tuple[str, ...]
    answer: int | None
    task: str = ""
    video: str | None = None
    frames: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    preamble: str = ""
    instruction: str = DEFAULT_INSTRUCTION
    option_format: str = DEFAULT_OPTION_FORMAT
    options_header: str = ""
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        where = f"record {self.uid!r}"
        if not self.question:
            raise RecordError(f"{where}: field 'question' is empty")
        if not 2 <= len(self.options) <= len(LETTERS):
            raise RecordError(f"{where}: field 'options' must hold 2 to {len(LETTERS)} options, "
                              f"got {len(self.options)}")
        if self.answer is not None and not 0 <= self.answer < len(self.options):
            raise RecordError(f"{where}: field 'answer' {self.answer} is not an option index "
                              f"(0..{len(self.options) - 1})")
        if (self.video is None) == (self.frames is None):
            raise RecordError(f"{where}: exactly one of 'video' and 'frames' must be given")
        if self.frames is not None:
            f = self.frames
            if f.dtype != np.uint8 or f.ndim != 4 or f.shape[-1] != 3:
                raise RecordError(f"{where}: field 'frames' must be (T, H, W, 3) uint8, got {f.shape} {f.dtype}")
            if self.timestamps is None or np.shape(self.timestamps) != (f.shape[0],):
                raise RecordError(f"{where}: field 'timestamps' must be ({f.shape[0]},) seconds")
        try:
            self.option_format.format(letter="A", option="x")
        except (KeyError, IndexError, ValueError) as e:
            raise RecordError(f"{where}: field 'option_format' {self.option_format!r} must use only "
                              f"{{letter}} and {{option}} ({e!r})") from None

    @property
    def answer_letter(self) -> str | None:
        return None if self.answer is None else LETTERS[self.answer]

    def text(self) -> str:
        """The text after the video: [preamble] question, [options header], one "A. option" line each, instruction."""
        lines = [self.preamble + self.question]
        if self.options_header:
            lines.append(self.options_header)
        lines += [self.option_format.format(letter=LETTERS[i], option=o) for i, o in enumerate(self.options)]
        if self.instruction:
            lines.append(self.instruction)
        return "\n".join(lines)


def letter_index(letter: str, num_options: int, *, where: str) -> int:
    """"B" -> 1, checked against the number of options; `where` names the file/line/field."""
    s = str(letter).strip().upper()
    if len(s) != 1 or s not in LETTERS[:num_options]:
        raise RecordError(f"{where}: answer {letter!r} is not one of {list(LETTERS[:num_options])}")
    return LETTERS.index(s)


def strip_letter(option: str) -> str:
    """"A. Apples." / "(A) 1636" / "A) x" / "A: x" -> the option text; bare options are returned as is."""
    s = option.strip()
    if len(s) >= 3 and s[0] == "(" and s[1] in LETTERS and s[2] == ")":
        return s[3:].strip()
    if len(s) >= 2 and s[0] in LETTERS and s[1] in ".):" and (len(s) == 2 or s[2] == " "):
        return s[2:].strip()
    return s


def strip_letters(options: Sequence[str]) -> tuple[str, ...]:
    """Strips letter prefixes only when every option carries its own letter in order (A, B, C...)."""
    opts = [str(o) for o in options]
    lettered = all(
        (o.strip()[:1] == LETTERS[i] or o.strip()[:2] == f"({LETTERS[i]}") and strip_letter(o) != o.strip()
        for i, o in enumerate(opts))
    return tuple(strip_letter(o) for o in opts) if lettered else tuple(o.strip() for o in opts)
