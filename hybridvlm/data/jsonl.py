"""The local dataset format: a JSONL file, one multiple-choice question per line.

    {"video": "clips/cat.mp4", "question": "What colour is the cat?",
     "options": ["A. black", "B. white", "C. orange"], "answer": "B", "task": "color"}

- video: absolute, or relative to the JSONL file's folder (or to `video_dir=` if given).
- options: 2 to 10 strings, bare ("black") or lettered in order ("A. black", "(A) black").
- answer: the correct option's letter, or null where the answer is hidden.
- optional: task (str), uid (str or int; default "<file stem>/<line>"), preamble,
  instruction, option_format and options_header (the prompt text around the question and
  how option lines are written, see VideoQARecord.text), meta (object).
  Any other key is kept in the record's meta.

`write_jsonl` writes any records that have a `video` in this format (uid, prompt text and
meta included), so every benchmark can be converted to it and read back unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from hybridvlm import atomic
from hybridvlm.data.readers_common import (
    Collector,
    ReadResult,
    as_object,
    get,
    get_options,
    load_rows,
    make_record,
)
from hybridvlm.data.records import DEFAULT_INSTRUCTION, DEFAULT_OPTION_FORMAT, RecordError, VideoQARecord, letter_index

FIELDS = ("uid", "video", "question", "options", "answer", "task", "preamble", "instruction", "option_format",
          "options_header", "meta")


def read_jsonl(path: str | os.PathLike, *, video_dir: str | os.PathLike | None = None) -> ReadResult:
    """Reads a local-format JSONL file (see the module docstring).

    Questions whose video file is missing are logged, listed in `skipped` and left out.
    Raises RecordError naming the file, line and field for a malformed line (bad JSON, a
    missing or mistyped field, an answer letter outside the options, a duplicate uid).
    """
    path = os.path.abspath(os.fspath(path))
    base = os.path.abspath(os.fspath(video_dir)) if video_dir is not None else os.path.dirname(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    collector = Collector(f"jsonl:{path}")
    for where, value in load_rows(path):
        row = as_object(value, where)
        line = where.rsplit(" ", 1)[1]  # where = "<file>, line N"
        collector.add(_record(row, where, base=base, default_uid=f"{stem}/{line}"), where)
    return collector.finish()


def _record(row: dict, where: str, *, base: str, default_uid: str) -> VideoQARecord:
    video = get(row, "video", "str", where)
    options = get_options(row, "options", where)
    if "answer" not in row:
        raise RecordError(f"{where}: missing field 'answer' (a letter, or null when hidden)")
    letter = get(row, "answer", "str", where, optional=True)
    answer = None if letter is None else letter_index(letter, len(options), where=f"{where}: field 'answer'")
    meta = dict(get(row, "meta", "dict", where, optional=True) or {})
    meta.update({k: v for k, v in row.items() if k not in FIELDS})
    instruction = get(row, "instruction", "str", where, optional=True)
    return make_record(
        where,
        uid=get(row, "uid", "id", where, optional=True) or default_uid,
        question=get(row, "question", "str", where),
        options=options,
        answer=answer,
        task=get(row, "task", "str", where, optional=True) or "",
        video=os.path.normpath(os.path.join(base, os.path.expanduser(video))),
        preamble=get(row, "preamble", "str", where, optional=True) or "",
        instruction=DEFAULT_INSTRUCTION if instruction is None else instruction,
        option_format=get(row, "option_format", "str", where, optional=True) or DEFAULT_OPTION_FORMAT,
        options_header=get(row, "options_header", "str", where, optional=True) or "",
        meta=meta,
    )


def write_jsonl(records: Iterable[VideoQARecord], path: str | os.PathLike, *, relative: bool = False) -> int:
    """Writes records in the local format, atomically (a temporary file, then a rename).

    Options are written bare and the answer as a letter; uid, task, preamble, instruction,
    option_format, options_header (when not the default) and meta (when not empty) are
    kept, so read_jsonl gives the same records back. Video paths are absolute, or with relative=True relative to the
    file's folder (a set that can be moved together with its videos).
    Returns the number of records written. Raises ValueError for a record without a video
    file (decoded frames) or with a meta that is not JSON-serialisable; nothing is written then.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    lines = [_line(record, folder, relative=relative) for record in records]
    atomic.write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _line(record: VideoQARecord, folder: str, *, relative: bool) -> str:
    if record.video is None:
        raise ValueError(f"record {record.uid!r}: has decoded frames but no video file; "
                         "write_jsonl needs records with `video`")
    video = os.path.abspath(record.video)
    obj = {
        "uid": record.uid,
        "video": os.path.relpath(video, folder) if relative else video,
        "question": record.question,
        "options": list(record.options),
        "answer": record.answer_letter,
        "task": record.task,
    }
    if record.preamble:
        obj["preamble"] = record.preamble
    if record.instruction != DEFAULT_INSTRUCTION:
        obj["instruction"] = record.instruction
    if record.option_format != DEFAULT_OPTION_FORMAT:
        obj["option_format"] = record.option_format
    if record.options_header:
        obj["options_header"] = record.options_header
    if record.meta:
        obj["meta"] = dict(record.meta)
    try:
        return json.dumps(obj, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"record {record.uid!r}: field 'meta' is not JSON-serialisable ({e})") from None
