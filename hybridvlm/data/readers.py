"""Readers for the long-video multiple-choice benchmarks, from their released files.

Each reader takes the folder a user downloaded and unpacked (layouts in the functions'
docstrings), returns a `ReadResult` of `VideoQARecord`s with absolute video paths, the
benchmark's category as `task`, its ids/durations in `meta`, and the reference evaluators'
prompt wording in `preamble`/`instruction`, so `record.text()` is the benchmark's prompt.

    result = read_benchmark("videomme", "~/data/Video-MME")
    result = check_videos(result, decode=True)   # optional: find unreadable files up front

Questions whose video is missing are logged and listed in `result.skipped`; a malformed
annotation raises RecordError naming the file, line/record and field (see readers_common).
The local JSONL format (read_jsonl / write_jsonl) is in `hybridvlm.data.jsonl`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from hybridvlm.data.jsonl import read_jsonl, write_jsonl
from hybridvlm.data.readers_common import (
    Collector,
    ReadResult,
    as_object,
    check_videos,
    find_annotations,
    get,
    get_options,
    get_strings,
    load_rows,
    make_record,
    pick,
)
from hybridvlm.data.records import DEFAULT_INSTRUCTION, LETTERS, RecordError, letter_index

__all__ = [
    "BENCHMARKS",
    "LVBENCH_INSTRUCTION",
    "MLVU_TASKS",
    "ReadResult",
    "check_videos",
    "read_benchmark",
    "read_jsonl",
    "read_longvideobench",
    "read_lvbench",
    "read_mlvu",
    "read_videomme",
    "split_inline_options",
    "videomme_preamble",
    "write_jsonl",
]

BENCHMARKS = ("videomme", "longvideobench", "lvbench", "mlvu", "jsonl")

# LVBench's and MLVU's option lines in the reference evaluators: "(A) 1636".
PAREN_OPTION = "({letter}) {option}"
# Video-MME's official frames-only prompt (its README, VLMEvalKit); lmms-eval's default
# wording says "based on the video and the subtitles" even without subtitles.
VIDEOMME_PREAMBLE = ("Select the best answer to the following multiple-choice question based on the video. "
                     "Respond with only the letter ({letters}) of the correct option.\n")
VIDEOMME_INSTRUCTION = "The best answer is:"
# LVBench's line after the options in lmms-eval and VLMEvalKit.
LVBENCH_INSTRUCTION = "Answer the question with the option letter."
# MLVU's multiple-choice evaluation: the system prompt, "Question: ", then the options.
MLVU_PREAMBLE = ("Carefully watch this video and pay attention to every detail. Based on your observations, "
                 "select the best option that accurately addresses the question.\nQuestion: ")
MLVU_INSTRUCTION = "Only give the best option."
# MLVU dev set: the multiple-choice tasks (8_sub_scene and 9_summary are open-ended).
MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")

_VIDEOMME_EXTS = (".mp4", ".MP4", ".mkv")
_LVB_FILES = {"val": ("lvb_val.json", "validation-*.parquet"), "test": ("lvb_test_wo_gt.json", "test-*.parquet")}
_LVB_META = ("video_id", "id", "duration_group", "duration", "position", "topic_category", "level",
             "question_wo_referring_query", "subtitle_path", "starting_timestamp_for_subtitles", "view_count")
_INLINE_OPTION = re.compile(r"(?:^|(?<=\s))\(([A-J])\)\s*")


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def _rows(files: Sequence[str]):
    for path in files:
        for where, value in load_rows(path):
            yield where, as_object(value, where)


def videomme_preamble(num_options: int = 4) -> str:
    """Video-MME's instruction before the question, its letter list fitted to the options."""
    letters = list(LETTERS[:num_options])
    phrase = " or ".join(letters) if num_options == 2 else ", ".join(letters[:-1]) + ", or " + letters[-1]
    return VIDEOMME_PREAMBLE.format(letters=phrase)


def read_videomme(root: str | os.PathLike, *, split: str = "test", video_dir: str | os.PathLike | None = None,
                  annotations: str | os.PathLike | None = None) -> ReadResult:
    """Video-MME (HF lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` and videos
    `data/<videoID>.mp4` (or .MP4, .mkv) under root.

    The annotation may also be a JSON list or JSONL of the same records (some mirrors ship
    those): found as videomme/<split>*.{parquet,jsonl,json} or <split>*.* in root, or given
    as `annotations=`. Parquet needs pyarrow (a tensorflow-datasets dependency).
    Records: uid "videomme/<question_id>", task = task_type, meta = ids, duration category,
    domain, sub_category, url. Prompt: Video-MME's frames-only prompt (no subtitles).
    """
    root = _abs(root)
    videos = _abs(video_dir) if video_dir is not None else os.path.join(root, "data")
    files = [_abs(annotations)] if annotations is not None else find_annotations(
        "Video-MME", [os.path.join(root, "videomme"), root],
        [f"{split}-*.parquet", f"{split}.parquet", f"{split}*.jsonl", f"{split}*.json"])
    collector = Collector("videomme", video_dir=videos)
    for where, row in _rows(files):
        video_name = get(row, "videoID", "id", where)
        options = get_options(row, "options", where)
        paths = [os.path.join(videos, video_name + ext) for ext in _VIDEOMME_EXTS]
        record = make_record(
            where,
            uid=f"videomme/{get(row, 'question_id', 'id', where)}",
            question=get(row, "question", "str", where),
            options=options,
            answer=letter_index(get(row, "answer", "str", where), len(options), where=f"{where}: field 'answer'"),
            task=get(row, "task_type", "str", where),
            video=next((p for p in paths if os.path.exists(p)), paths[0]),
            preamble=videomme_preamble(len(options)),
            instruction=VIDEOMME_INSTRUCTION,
            meta=pick(row, ("video_id", "videoID", "question_id", "duration", "domain", "sub_category", "url")),
        )
        collector.add(record, where)
    return collector.finish()


def read_longvideobench(root: str | os.PathLike, *, split: str = "val", video_dir: str | os.PathLike | None = None,
                        annotations: str | os.PathLike | None = None) -> ReadResult:
    """LongVideoBench (HF longvideobench/LongVideoBench): `lvb_val.json` / `lvb_test_wo_gt.json`
    (or the parquet `validation-*.parquet` / `test-*.parquet`, options as option0..option4
    with "N/A" for unused ones) and videos `videos/<video_path>` under root.

    split "val" (or "validation") has answers (`correct_choice`, 0-based); "test" hides
    them: answer None. Records: uid "longvideobench/<id>", task = question_category,
    meta = video_id, id, duration_group, duration (s), position, topic_category, level, ...
    Prompt: "{question}\\nA. ...\\nAnswer with the option's letter from the given choices directly."
    """
    split = {"validation": "val"}.get(split, split)
    if split not in _LVB_FILES:
        raise ValueError(f"LongVideoBench split must be one of {sorted(_LVB_FILES)}, got {split!r}")
    root = _abs(root)
    videos = _abs(video_dir) if video_dir is not None else os.path.join(root, "videos")
    files = [_abs(annotations)] if annotations is not None else find_annotations(
        "LongVideoBench", [root], _LVB_FILES[split])
    collector = Collector(f"longvideobench/{split}", video_dir=videos)
    for where, row in _rows(files):
        if "candidates" in row:
            options = get_options(row, "candidates", where)
        else:  # parquet: option0..option4, "N/A" where unused
            names = [f"option{i}" for i in range(len(LETTERS)) if f"option{i}" in row]
            if not names:
                raise RecordError(f"{where}: missing field 'candidates' (or option0..option4)")
            options = tuple(get(row, n, "str", where) for n in names)
            options = tuple(o for o in options if o != "N/A")
        choice = get(row, "correct_choice", "int", where, optional=True)
        if choice is not None and not 0 <= choice < len(options):
            raise RecordError(f"{where}: field 'correct_choice' {choice} is not an option index "
                              f"(0..{len(options) - 1})")
        record = make_record(
            where,
            uid=f"longvideobench/{get(row, 'id', 'id', where)}",
            question=get(row, "question", "str", where),
            options=options,
            answer=choice,
            task=get(row, "question_category", "str", where),
            video=os.path.join(videos, get(row, "video_path", "str", where)),
            instruction=DEFAULT_INSTRUCTION,
            meta=pick(row, _LVB_META),
        )
        collector.add(record, where)
    return collector.finish()


def split_inline_options(text: str, where: str) -> tuple[str, tuple[str, ...]]:
    """LVBench's "question\\n(A) x\\n(B) y ..." -> ("question", ("x", "y", ...)).

    The options are the run of "(A)", "(B)", ... markers (each at the start or after
    whitespace, in letter order) that starts at the last "(A)".
    """
    matches = list(_INLINE_OPTION.finditer(text))
    firsts = [i for i, m in enumerate(matches) if m.group(1) == "A"]
    if not firsts:
        raise RecordError(f"{where}: field 'question' has no inline options \"(A) ...\"")
    run = [matches[firsts[-1]]]
    for m in matches[firsts[-1] + 1:]:
        if len(run) < len(LETTERS) and m.group(1) == LETTERS[len(run)]:
            run.append(m)
    ends = [m.start() for m in run[1:]] + [len(text)]
    options = tuple(text[m.end():end].strip() for m, end in zip(run, ends))
    if len(options) < 2 or not all(options):
        raise RecordError(f"{where}: field 'question' must end with at least two non-empty inline options "
                          f"\"(A) ...\", \"(B) ...\", got {len(options)}")
    return text[:run[0].start()].strip(), options


def read_lvbench(root: str | os.PathLike, *, video_dir: str | os.PathLike | None = None,
                 annotations: str | os.PathLike | None = None) -> ReadResult:
    """LVBench (THUDM/LVBench): `video_info.meta.jsonl` (in root or root/data), one line per
    video {key, type, qa: [{uid, question, answer, question_type, time_reference}], video_info};
    videos `<key>.mp4` in video_dir (default root/videos if it exists, else root).

    The options are inline in the question ("\\n(A) ...") and are parsed out of it.
    Records: uid "lvbench/<uid>", task = the question_type labels joined with ", ",
    meta = key, type, question_type (list), time_reference, video_info.
    Prompt: "{question}\\nA. ...\\nAnswer the question with the option letter."
    """
    root = _abs(root)
    if video_dir is not None:
        videos = _abs(video_dir)
    else:
        videos = os.path.join(root, "videos") if os.path.isdir(os.path.join(root, "videos")) else root
    files = [_abs(annotations)] if annotations is not None else find_annotations(
        "LVBench", [root, os.path.join(root, "data")], ["video_info.meta.jsonl"])
    collector = Collector("lvbench", video_dir=videos)
    for where, row in _rows(files):
        key = get(row, "key", "id", where)
        video = os.path.join(videos, key + ".mp4")
        extra = pick(row, ("key", "type", "video_info"))
        for j, item in enumerate(get(row, "qa", "list", where)):
            at = f"{where}, qa[{j}]"
            item = as_object(item, at)
            question, options = split_inline_options(get(item, "question", "str", at), at)
            labels = item.get("question_type")
            labels = [labels] if isinstance(labels, str) else get_strings(item, "question_type", at)
            record = make_record(
                at,
                uid=f"lvbench/{get(item, 'uid', 'id', at, optional=True) or f'{key}_{j}'}",
                question=question,
                options=options,
                answer=letter_index(get(item, "answer", "str", at), len(options), where=f"{at}: field 'answer'"),
                task=", ".join(labels),
                video=video,
                instruction=LVBENCH_INSTRUCTION,
                option_format=PAREN_OPTION,
                meta={**extra, "question_type": labels, **pick(item, ("uid", "time_reference"))},
            )
            collector.add(record, at)
    return collector.finish()


def read_mlvu(root: str | os.PathLike, *, tasks: Sequence[str] = MLVU_TASKS,
              video_dir: str | os.PathLike | None = None) -> ReadResult:
    """MLVU dev set (HF MLVU/MVLU): `json/<task>.json` and videos `video/<task>/<video>`
    under root (root may also be the folder holding `MLVU/`).

    Record fields {video, duration, question, candidates, answer (the option text),
    question_type}; the answer text is matched to its option. A task file that is absent
    is reported in `skipped` (all absent: FileNotFoundError). Records: uid
    "mlvu/<task>/<index>", task = the json stem, meta = question_type, duration, video.
    Prompt: MLVU's system prompt, "Question: {question}", the options, "Only give the best option."
    """
    root = _abs(root)
    if not os.path.isdir(os.path.join(root, "json")) and os.path.isdir(os.path.join(root, "MLVU", "json")):
        root = os.path.join(root, "MLVU")
    videos = _abs(video_dir) if video_dir is not None else os.path.join(root, "video")
    paths = {task: os.path.join(root, "json", f"{task}.json") for task in tasks}
    if not any(os.path.isfile(p) for p in paths.values()):
        raise FileNotFoundError(f"MLVU: no task annotation file found (looked for {', '.join(paths.values())})")
    collector = Collector("mlvu", video_dir=videos)
    for task, path in paths.items():
        if not os.path.isfile(path):
            collector.skip_file(path, "annotation file not found")
            continue
        for index, (where, row) in enumerate(_rows([path])):
            options = get_options(row, "candidates", where, kind="scalar")
            answer = str(get(row, "answer", "scalar", where)).strip()
            raw = [c.strip() for c in get_strings(row, "candidates", where, kind="scalar")]
            if answer not in raw and answer not in options:
                raise RecordError(f"{where}: field 'answer' {answer!r} is not one of the candidates")
            record = make_record(
                where,
                uid=f"mlvu/{task}/{index}",
                question=get(row, "question", "str", where),
                options=options,
                answer=raw.index(answer) if answer in raw else options.index(answer),
                task=task,
                video=os.path.join(videos, task, get(row, "video", "str", where)),
                preamble=MLVU_PREAMBLE,
                instruction=MLVU_INSTRUCTION,
                option_format=PAREN_OPTION,
                options_header="Options:",
                meta=pick(row, ("question_type", "duration", "video")),
            )
            collector.add(record, where)
    return collector.finish()


_READERS: dict[str, Callable[..., ReadResult]] = {
    "videomme": read_videomme,
    "longvideobench": read_longvideobench,
    "lvbench": read_lvbench,
    "mlvu": read_mlvu,
    "jsonl": read_jsonl,
}


def read_benchmark(name: str, root: str | os.PathLike, **kwargs) -> ReadResult:
    """Reads benchmark `name` (one of BENCHMARKS; case, "-" and "_" ignored, so "Video-MME"
    works) from root (for "jsonl": the file), passing kwargs to its reader."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _READERS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return _READERS[key](root, **kwargs)
