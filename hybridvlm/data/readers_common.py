"""What every benchmark reader shares: the result type, annotation files, typed fields, videos.

Errors come in two kinds. A malformed annotation (bad JSON, a missing field, a wrong type,
an answer that is not an option) raises `RecordError` whose message starts with the place:
"<file>, line N" (JSONL, 1-based), "<file>, record I" (JSON list, 0-based index) or
"<file>, row I" (parquet, 0-based), then the field. A question whose video file is missing
(or, with `check_videos(decode=True)`, unreadable) is not an error: it is logged, listed in
`ReadResult.skipped` and left out, and reading goes on.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from hybridvlm.data.records import RecordError, VideoQARecord, strip_letters
from hybridvlm.video import VideoError, read_video

log = logging.getLogger("hybridvlm.data.readers")

# check_videos(decode=True) samples this many frames (at this size) to prove a file decodes:
# spread over the whole duration, so a file truncated well before its header's end fails.
_CHECK_FRAMES = 4
_CHECK_SIZE = (32, 32)


@dataclasses.dataclass
class ReadResult:
    """Questions read from one source, and those left out.

    Attributes:
      records: the questions whose video file is present, in file order.
      skipped: (uid, reason) per question left out (reason names the video file), or
        (file, reason) for a whole annotation file that is absent (MLVU tasks).
      source: what was read ("videomme", "jsonl:<file>", ...).
    """

    records: list[VideoQARecord] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    source: str = ""

    @property
    def num_read(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[VideoQARecord]:
        return iter(self.records)

    def summary(self) -> str:
        return f"{self.source}: {self.num_read} questions read, {self.num_skipped} skipped"


# --------------------------------------------------------------------------------------
# Annotation files
# --------------------------------------------------------------------------------------


def load_rows(path: str | os.PathLike) -> list[tuple[str, Any]]:
    """(where, value) for each record of an annotation file, by extension.

    .jsonl: one JSON value per non-blank line, where = "<file>, line N" (1-based);
    .json: a JSON list, where = "<file>, record I" (0-based);
    .parquet: the table's rows as dicts, where = "<file>, row I" (0-based; needs pyarrow).
    Raises RecordError naming the file (and line) for unparsable content.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return _parquet_rows(path)
    if ext == ".jsonl":
        return list(_jsonl_rows(path))
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
        if not isinstance(data, list):
            raise RecordError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        return [(f"{path}, record {i}", value) for i, value in enumerate(data)]
    raise RecordError(f"{path}: unsupported annotation file type {ext!r} (use .json, .jsonl or .parquet)")


def _jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: invalid JSON at column {e.colno} ({e.msg})") from None


def _parquet_rows(path: str) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: a tensorflow-datasets dependency, not ours
    except ImportError:
        raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                          "or give the same records as .json/.jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow.ArrowInvalid / OSError for a damaged file
        raise RecordError(f"{path}: not a readable parquet file ({e})") from None
    return [(f"{path}, row {i}", row) for i, row in enumerate(rows)]


def find_annotations(name: str, folders: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The annotation files of the first (folder, pattern) that matches, sorted (shards in order).

    Raises FileNotFoundError listing where it looked.
    """
    for folder in folders:
        for pattern in patterns:
            found = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
            if found:
                return found
    looked = ", ".join(os.path.join(folder, p) for folder in folders for p in patterns)
    raise FileNotFoundError(f"{name}: no annotation file found (looked for {looked})")


# --------------------------------------------------------------------------------------
# Typed fields
# --------------------------------------------------------------------------------------

_KINDS = {
    "str": ((str,), "a string"),
    "id": ((str, int), "a string or an integer"),
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
    "scalar": ((str, int, float), "a string or a number"),
    "list": ((list, tuple), "a list"),
    "dict": ((dict,), "an object"),
}


def as_object(value: Any, where: str) -> dict:
    """The record itself must be a JSON object (dict)."""
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected an object with the record's fields, got {type(value).__name__}")
    return value


def get(row: dict, name: str, kind: str, where: str, *, optional: bool = False) -> Any:
    """row[name] checked against kind (see _KINDS; "id" values come back as str).

    A missing or null field is None when optional, else a RecordError naming it.
    """
    value = row.get(name)
    if value is None:
        if optional:
            return None
        raise RecordError(f"{where}: missing field {name!r}")
    types, description = _KINDS[kind]
    if isinstance(value, bool) or not isinstance(value, types):
        raise RecordError(f"{where}: field {name!r} must be {description}, got {type(value).__name__} "
                          f"{_short(value)}")
    return str(value) if kind == "id" else value


def get_strings(row: dict, name: str, where: str, *, kind: str = "str") -> list[str]:
    """A list field whose items are `kind` values, returned as str."""
    values = get(row, name, "list", where)
    types, description = _KINDS[kind]
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, types):
            raise RecordError(f"{where}: field '{name}[{i}]' must be {description}, got "
                              f"{type(value).__name__} {_short(value)}")
    return [str(v) for v in values]


def get_options(row: dict, name: str, where: str, *, kind: str = "str") -> tuple[str, ...]:
    """The options in field `name`: lettered ("A. x", "(A) x") or bare, as bare texts."""
    return strip_letters(get_strings(row, name, where, kind=kind))


def pick(row: dict, names: Iterable[str]) -> dict:
    """The listed fields that are present and not null (for `meta`)."""
    return {k: row[k] for k in names if row.get(k) is not None}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def make_record(where: str, **fields) -> VideoQARecord:
    """VideoQARecord(**fields), its own RecordError prefixed with the place."""
    try:
        return VideoQARecord(**fields)
    except RecordError as e:
        raise RecordError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------
# Videos: collect, report, skip
# --------------------------------------------------------------------------------------


def video_problem(path: str, *, decode: bool) -> str | None:
    """Why a video file cannot be used (None if it can): absent, or (decode) not decodable."""
    if not os.path.exists(path):
        return "video file not found"
    if not os.path.isfile(path):
        return "not a file"
    if decode:
        try:
            read_video(path, max_frames=_CHECK_FRAMES, size=_CHECK_SIZE)
        except VideoError as e:
            return f"unreadable video: {e.reason}"
        except Exception as e:  # one odd file must not stop a scan of thousands
            return f"unreadable video: {type(e).__name__}: {e}"
    return None


class Collector:
    """Builds a ReadResult: checks uids are unique, keeps questions whose video is usable.

    A problem video is logged once (with its reason) however many questions use it; when
    the whole video folder is absent one warning says so instead of one per file.
    """

    def __init__(self, source: str, *, video_dir: str | None = None, decode: bool = False):
        self.result = ReadResult(source=source)
        self._decode = decode
        self._where: dict[str, str] = {}
        self._problems: dict[str, str | None] = {}
        self._folder_missing = video_dir is not None and not os.path.isdir(video_dir)
        self._video_dir = video_dir

    def add(self, record: VideoQARecord, where: str) -> None:
        """Adds a record read at `where`; a duplicate uid is a RecordError."""
        if record.uid in self._where:
            raise RecordError(f"{where}: duplicate uid {record.uid!r} (also at {self._where[record.uid]})")
        self._where[record.uid] = where
        self.keep(record)

    def keep(self, record: VideoQARecord) -> None:
        """Keeps the record if its video is usable, else reports and skips it."""
        if record.video is None:  # decoded frames: nothing to check
            self.result.records.append(record)
            return
        if record.video not in self._problems:
            problem = video_problem(record.video, decode=self._decode)
            self._problems[record.video] = problem
            if problem and not self._folder_missing:
                log.warning("%s: %s; skipping its questions (first: %s)", record.video, problem, record.uid)
        problem = self._problems[record.video]
        if problem:
            self.result.skipped.append((record.uid, f"{record.video}: {problem}"))
        else:
            self.result.records.append(record)

    def skip_file(self, path: str, reason: str) -> None:
        """Reports a whole annotation file left out."""
        log.warning("%s: %s; skipped", path, reason)
        self.result.skipped.append((path, reason))

    def finish(self) -> ReadResult:
        if self._folder_missing and self.result.skipped:
            log.warning("%s: video folder %s not found: all %d questions skipped",
                        self.result.source, self._video_dir, self.result.num_skipped)
        if self.result.skipped:
            log.warning("%s", self.result.summary())
        return self.result


def check_videos(result: ReadResult, *, decode: bool = False) -> ReadResult:
    """A new ReadResult with only the questions whose video file exists (and, with decode,
    opens and decodes a few frames spread over its length with `hybridvlm.video.read_video`).

    Each video is checked once; the others are logged and added to `skipped` (uid, reason
    naming the file), after the result's earlier skips. Decoding every video of a large
    benchmark takes a while (a few seeks per file); without decode only existence is checked.
    """
    collector = Collector(result.source, decode=decode)
    collector.result.skipped.extend(result.skipped)
    for record in result.records:
        collector.keep(record)
    return collector.finish()
