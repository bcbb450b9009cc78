"""Tests for the benchmark readers and the local JSONL format (hybridvlm.data.readers, .jsonl).

Each benchmark gets small hand-written annotation files in its released layout (see
shared BENCHMARKS.md) and tiny real clips (write_test_clip); the records must carry the
right question, options, answer, video path and task, and `text()` must be the benchmark's
reference prompt. Malformed files must fail naming file, line/record and field.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

from hybridvlm.data.jsonl import read_jsonl, write_jsonl
from hybridvlm.data.readers import (
    BENCHMARKS,
    ReadResult,
    check_videos,
    read_benchmark,
    read_longvideobench,
    read_lvbench,
    read_mlvu,
    read_videomme,
    split_inline_options,
)
from hybridvlm.data.records import RecordError, VideoQARecord
from hybridvlm.video import write_test_clip

LOGGER = "hybridvlm.data.readers"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    """One tiny real clip (4 frames, 32x32); tests copy it wherever a video should be."""
    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    write_test_clip(path, num_frames=4, fps=4, height=32, width=32)
    return path


def _put(clip: str, path) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(clip, path)
    return str(path)


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def _write_json(path, value) -> str:
    return _write(path, json.dumps(value))


def _write_jsonl(path, rows) -> str:
    return _write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# --------------------------------------------------------------------------------------
# Video-MME
# --------------------------------------------------------------------------------------

VIDEOMME_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
                   "Respond with only the letter (A, B, C, or D) of the correct option.\n"
                   "What is on the table?\nA. Apples.\nB. Candles.\nC. Books.\nD. Cups.\nThe best answer is:")


def _videomme_rows():
    base = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Astronomy",
            "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8"}
    return [
        {**base, "question_id": "001-1", "task_type": "Object Recognition", "question": "What is on the table?",
         "options": ["A. Apples.", "B. Candles.", "C. Books.", "D. Cups."], "answer": "B"},
        {**base, "question_id": "001-2", "task_type": "Counting Problem", "question": "How many stars?",
         "options": ["A. 1.", "B. 2.", "C. 3.", "D. 4."], "answer": "D"},
        {**base, "video_id": "002", "videoID": "mkvVideo", "duration": "long", "question_id": "002-1",
         "task_type": "OCR Problems", "question": "What does the sign say?",
         "options": ["A. Stop.", "B. Go.", "C. Wait.", "D. Exit."], "answer": "A"},
        {**base, "video_id": "003", "videoID": "gone", "question_id": "003-1", "task_type": "Action Reasoning",
         "question": "Why does he run?", "options": ["A. a", "B. b", "C. c", "D. d"], "answer": "C"},
    ]


def _check_videomme(result: ReadResult, root):
    assert [r.uid for r in result.records] == ["videomme/001-1", "videomme/001-2", "videomme/002-1"]
    first = result.records[0]
    assert first.question == "What is on the table?"
    assert first.options == ("Apples.", "Candles.", "Books.", "Cups.")
    assert first.answer == 1 and first.task == "Object Recognition"
    assert first.video == str(root / "data" / "fFjv93ACGo8.mp4")
    assert first.meta["duration"] == "short" and first.meta["video_id"] == "001"
    assert first.text() == VIDEOMME_PROMPT
    assert result.records[2].video == str(root / "data" / "mkvVideo.mkv")
    assert result.skipped == [("videomme/003-1", f"{root / 'data' / 'gone.mp4'}: video file not found")]


def test_videomme_parquet(tmp_path, clip, caplog):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _put(clip, tmp_path / "data" / "fFjv93ACGo8.mp4")
    _put(clip, tmp_path / "data" / "mkvVideo.mkv")
    (tmp_path / "videomme").mkdir()
    pq.write_table(pa.Table.from_pylist(_videomme_rows()), tmp_path / "videomme" / "test-00000-of-00001.parquet")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = read_videomme(tmp_path)
    _check_videomme(result, tmp_path)
    assert "gone.mp4: video file not found" in caplog.text
    assert (result.num_read, result.num_skipped) == (3, 1)


@pytest.mark.parametrize("name", ["videomme/test.json", "videomme/test.jsonl", "test-00000-of-00001.json"])
def test_videomme_json_mirrors(tmp_path, clip, name):
    _put(clip, tmp_path / "data" / "fFjv93ACGo8.mp4")
    _put(clip, tmp_path / "data" / "mkvVideo.mkv")
    if name.endswith(".jsonl"):
        _write_jsonl(tmp_path / name, _videomme_rows())
    else:
        _write_json(tmp_path / name, _videomme_rows())
    _check_videomme(read_benchmark("Video-MME", tmp_path), tmp_path)


def test_videomme_parquet_without_pyarrow_names_file_and_fix(tmp_path, monkeypatch):
    path = _write(tmp_path / "videomme" / "test-00000-of-00001.parquet", "PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow") as e:
        read_videomme(tmp_path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_videomme_video_dir_override_and_missing_folder(tmp_path, clip, caplog):
    _write_json(tmp_path / "videomme" / "test.json", _videomme_rows()[:2])
    _put(clip, tmp_path / "elsewhere" / "fFjv93ACGo8.MP4")
    result = read_videomme(tmp_path, video_dir=tmp_path / "elsewhere")
    assert [r.video for r in result] == [str(tmp_path / "elsewhere" / "fFjv93ACGo8.MP4")] * 2
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = read_videomme(tmp_path)  # no data/ folder at all: one warning, not one per file
    assert result.num_read == 0 and result.num_skipped == 2
    assert "video folder" in caplog.text and "all 2 questions skipped" in caplog.text


# --------------------------------------------------------------------------------------
# LongVideoBench
# --------------------------------------------------------------------------------------

def _lvb_row(i, candidates, **extra):
    return {"video_id": f"vid{i}", "id": f"vid{i}_0", "question": f"Question {i}?",
            "question_wo_referring_query": f"Q{i}?", "candidates": candidates, "position": [1, 2],
            "topic_category": "NP-News-Programs", "question_category": "TOS", "level": "L2-Relation",
            "video_path": f"vid{i}.mp4", "subtitle_path": f"vid{i}_en.json", "duration_group": 600,
            "duration": 512.5, "starting_timestamp_for_subtitles": 0, "view_count": 10, **extra}


def test_longvideobench_val_and_hidden_test(tmp_path, clip):
    _put(clip, tmp_path / "videos" / "vid0.mp4")
    _put(clip, tmp_path / "videos" / "vid1.mp4")
    _write_json(tmp_path / "lvb_val.json", [
        _lvb_row(0, ["red", "blue", "green", "black", "white"], correct_choice=4),
        _lvb_row(1, ["yes", "no", "maybe", "never"], correct_choice=0),
    ])
    _write_json(tmp_path / "lvb_test_wo_gt.json", [_lvb_row(1, ["up", "down", "left", "right"])])
    val = read_longvideobench(tmp_path)
    assert [r.uid for r in val] == ["longvideobench/vid0_0", "longvideobench/vid1_0"]
    r = val.records[0]
    assert r.options == ("red", "blue", "green", "black", "white") and r.answer == 4 and r.answer_letter == "E"
    assert r.task == "TOS" and r.video == str(tmp_path / "videos" / "vid0.mp4")
    assert r.meta["duration_group"] == 600 and r.meta["duration"] == 512.5
    assert r.text() == ("Question 0?\nA. red\nB. blue\nC. green\nD. black\nE. white\n"
                        "Answer with the option's letter from the given choices directly.")
    test = read_benchmark("longvideobench", tmp_path, split="test")
    assert test.num_read == 1 and test.records[0].answer is None


def test_longvideobench_parquet_options_with_na(tmp_path, clip):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    _put(clip, tmp_path / "videos" / "vid0.mp4")
    row = _lvb_row(0, None, correct_choice=2)
    del row["candidates"]
    row.update(option0="a", option1="b", option2="c", option3="N/A", option4="N/A")
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "validation-00000-of-00001.parquet")
    r = read_longvideobench(tmp_path, split="validation").records[0]
    assert r.options == ("a", "b", "c") and r.answer == 2


# --------------------------------------------------------------------------------------
# LVBench
# --------------------------------------------------------------------------------------

def test_lvbench(tmp_path, clip, caplog):
    _put(clip, tmp_path / "videos" / "k1.mp4")
    lines = [
        {"key": "k1", "type": "sport", "video_info": {"duration_minutes": 70.5, "fps": 30.0},
         "qa": [{"uid": 101, "question": "What year is shown?\n(A) 1636\n(B) 1366\n(C) 1363\n(D) 1633",
                 "answer": "D", "question_type": ["key information retrieval", "reasoning"],
                 "time_reference": "00:15-00:19"},
                {"uid": 102, "question": "Who wins? (A) red (B) blue", "answer": "a",
                 "question_type": ["event understanding"], "time_reference": ""}]},
        {"key": "k2", "type": "documentary", "qa": [
            {"uid": 201, "question": "Q?\n(A) x\n(B) y", "answer": "B", "question_type": ["summarization"]}]},
    ]
    _write_jsonl(tmp_path / "video_info.meta.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = read_lvbench(tmp_path)
    assert [r.uid for r in result] == ["lvbench/101", "lvbench/102"]
    r = result.records[0]
    assert r.question == "What year is shown?" and r.options == ("1636", "1366", "1363", "1633")
    assert r.answer == 3 and r.task == "key information retrieval, reasoning"
    assert r.video == str(tmp_path / "videos" / "k1.mp4")
    assert r.meta["time_reference"] == "00:15-00:19" and r.meta["video_info"]["fps"] == 30.0
    assert r.text() == ("What year is shown?\n(A) 1636\n(B) 1366\n(C) 1363\n(D) 1633\n"
                        "Answer the question with the option letter.")
    assert result.records[1].options == ("red", "blue") and result.records[1].answer == 0
    assert result.skipped == [("lvbench/201", f"{tmp_path / 'videos' / 'k2.mp4'}: video file not found")]
    assert "k2.mp4" in caplog.text


def test_split_inline_options_takes_the_last_lettered_run():
    q, opts = split_inline_options("Is (A) or (B) right?\n(A) the (C) one\n(B) the other", "f")
    assert q == "Is (A) or (B) right?" and opts == ("the (C) one", "the other")


# --------------------------------------------------------------------------------------
# MLVU
# --------------------------------------------------------------------------------------

def test_mlvu(tmp_path, clip, caplog):
    mlvu = tmp_path / "MLVU"
    _put(clip, mlvu / "video" / "1_plotQA" / "movie.mp4")
    _put(clip, mlvu / "video" / "4_count" / "count.mp4")
    _write_json(mlvu / "json" / "1_plotQA.json", [
        {"video": "movie.mp4", "duration": 400.2, "question": "Who opens the door?",
         "candidates": ["the cat", "the dog", "the boy", "nobody"], "answer": "the boy", "question_type": "plotQA"}])
    _write_json(mlvu / "json" / "4_count.json", [
        {"video": "count.mp4", "duration": 200, "question": "How many jumps?",
         "candidates": [3, 5, 2, 4], "answer": 2, "question_type": "count"},
        {"video": "missing.mp4", "duration": 200, "question": "How many cars?",
         "candidates": ["1", "2"], "answer": "1", "question_type": "count"}])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = read_benchmark("MLVU", tmp_path)  # the folder holding MLVU/
    assert [r.uid for r in result] == ["mlvu/1_plotQA/0", "mlvu/4_count/0"]
    r = result.records[0]
    assert r.options == ("the cat", "the dog", "the boy", "nobody") and r.answer == 2
    assert r.task == "1_plotQA" and r.video == str(mlvu / "video" / "1_plotQA" / "movie.mp4")
    assert r.text() == ("Carefully watch this video and pay attention to every detail. Based on your observations, "
                        "select the best option that accurately addresses the question.\n"
                        "Question: Who opens the door?\nOptions:\n(A) the cat\n(B) the dog\n(C) the boy\n(D) nobody\n"
                        "Only give the best option.")
    assert result.records[1].options == ("3", "5", "2", "4") and result.records[1].answer == 2
    skipped = dict(result.skipped)
    assert skipped["mlvu/4_count/1"].endswith("missing.mp4: video file not found")
    assert skipped[str(mlvu / "json" / "2_needle.json")] == "annotation file not found"
    assert result.num_skipped == 1 + 5  # one question, five absent task files
    with pytest.raises(FileNotFoundError, match="MLVU"):
        read_mlvu(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------
# The local JSONL format
# --------------------------------------------------------------------------------------

def test_jsonl_missing_and_corrupt_videos_reported_and_skipped(tmp_path, clip, caplog):
    _put(clip, tmp_path / "set" / "clips" / "good.mp4")
    good_abs = _put(clip, tmp_path / "abs" / "other.mp4")
    _write(tmp_path / "set" / "clips" / "corrupt.mp4", "")
    (tmp_path / "set" / "clips" / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    path = _write_jsonl(tmp_path / "set" / "qa.jsonl", [
        {"video": "clips/good.mp4", "question": "Q1?", "options": ["A. a", "B. b"], "answer": "B", "task": "t1"},
        {"video": good_abs, "question": "Q2?", "options": ["x", "y", "z"], "answer": "c"},
        {"video": "clips/missing.mp4", "question": "Q3?", "options": ["x", "y"], "answer": "A"},
        {"video": "clips/corrupt.mp4", "question": "Q4?", "options": ["x", "y"], "answer": "A"},
    ])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = read_jsonl(path)
    assert [r.uid for r in result] == ["qa/1", "qa/2", "qa/4"]  # the corrupt file exists: kept for now
    assert result.skipped == [("qa/3", f"{tmp_path / 'set' / 'clips' / 'missing.mp4'}: video file not found")]
    assert "missing.mp4: video file not found" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        checked = check_videos(result, decode=True)
    assert [r.uid for r in checked] == ["qa/1", "qa/2"]
    assert [uid for uid, _ in checked.skipped] == ["qa/3", "qa/4"]
    reason = checked.skipped[1][1]
    assert reason.startswith(str(tmp_path / "set" / "clips" / "corrupt.mp4")) and "unreadable video" in reason
    assert "corrupt.mp4" in caplog.text
    r1, r2 = checked.records
    assert r1.video == str(tmp_path / "set" / "clips" / "good.mp4") and r1.options == ("a", "b")
    assert (r1.answer, r1.task) == (1, "t1") and r2.options == ("x", "y", "z") and r2.answer == 2
    assert r1.text() == "Q1?\nA. a\nB. b\nAnswer with the option's letter from the given choices directly."
    assert check_videos(result).num_read == 3  # without decode: existence only


def test_jsonl_video_dir_override_and_extra_keys_in_meta(tmp_path, clip):
    _put(clip, tmp_path / "media" / "v.mp4")
    path = _write_jsonl(tmp_path / "ann" / "s.jsonl", [
        {"video": "v.mp4", "question": "Q?", "options": ["(A) p", "(B) q"], "answer": None, "duration": 12.5},
    ])
    r = read_jsonl(path, video_dir=tmp_path / "media").records[0]
    assert r.video == str(tmp_path / "media" / "v.mp4") and r.options == ("p", "q")
    assert r.answer is None and r.meta == {"duration": 12.5}


MALFORMED = [
    ('{"video": "v.mp4", "question": "Q?", "options": ["a", "b"], "answer": "A"',
     "line 2", "invalid JSON"),
    ({"video": "v.mp4", "options": ["a", "b"], "answer": "A"}, "line 2", "missing field 'question'"),
    ({"video": "v.mp4", "question": "Q?", "options": "a, b", "answer": "A"},
     "line 2", "field 'options' must be a list"),
    ({"video": "v.mp4", "question": "Q?", "options": ["a", 3], "answer": "A"}, "line 2", "field 'options[1]'"),
    ({"video": "v.mp4", "question": "Q?", "options": ["a", "b"], "answer": "E"}, "line 2", "field 'answer'"),
    ({"video": "v.mp4", "question": "Q?", "options": ["a", "b"], "answer": 1},
     "line 2", "field 'answer' must be a string"),
    ({"video": "v.mp4", "question": "Q?", "options": ["a", "b"]}, "line 2", "missing field 'answer'"),
    ({"video": 7, "question": "Q?", "options": ["a", "b"], "answer": "A"}, "line 2", "field 'video'"),
    ({"video": "v.mp4", "question": "", "options": ["a", "b"], "answer": "A"}, "line 2", "field 'question' is empty"),
    ({"video": "v.mp4", "question": "Q?", "options": ["a"], "answer": "A"}, "line 2", "field 'options'"),
    ({"uid": "same", "video": "v.mp4", "question": "Q?", "options": ["a", "b"], "answer": "A"},
     "line 2", "duplicate uid 'same'"),
    (["not", "an", "object"], "line 2", "expected an object"),
]


@pytest.mark.parametrize("bad,line,field", MALFORMED, ids=[m[2] for m in MALFORMED])
def test_jsonl_malformed_names_file_line_field(tmp_path, bad, line, field):
    good = {"uid": "same", "video": "v.mp4", "question": "Q?", "options": ["a", "b"], "answer": "A"}
    path = _write_jsonl(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(RecordError) as e:
        read_jsonl(path)
    message = str(e.value)
    assert message.startswith(f"{path}, {line}: ") and field in message, message


@pytest.mark.parametrize("case", ["videomme_answer", "lvb_candidates", "lvb_choice", "lvbench_inline", "mlvu_answer",
                                  "json_not_list", "bad_json"])
def test_benchmark_malformed_names_file_record_field(tmp_path, case):
    rows = _videomme_rows()[:2]
    if case == "videomme_answer":
        rows[1]["answer"] = "E"
        path, read, expect = _write_json(tmp_path / "videomme" / "test.json", rows), read_videomme, \
            ("record 1", "field 'answer'")
    elif case in ("lvb_candidates", "lvb_choice"):
        bad = _lvb_row(1, ["a", "b"], correct_choice=2)
        if case == "lvb_candidates":
            del bad["candidates"]
        path = _write_json(tmp_path / "lvb_val.json", [_lvb_row(0, ["a", "b"], correct_choice=0), bad])
        read, expect = read_longvideobench, ("record 1", "candidates" if case == "lvb_candidates" else "correct_choice")
    elif case == "lvbench_inline":
        path = _write_jsonl(tmp_path / "video_info.meta.jsonl", [
            {"key": "k", "qa": [{"uid": 1, "question": "no options here", "answer": "A", "question_type": ["r"]}]}])
        read, expect = read_lvbench, ("line 1, qa[0]", "field 'question'")
    elif case == "mlvu_answer":
        path = _write_json(tmp_path / "json" / "1_plotQA.json", [
            {"video": "v.mp4", "question": "Q?", "candidates": ["a", "b"], "answer": "c"}])
        read, expect = read_mlvu, ("record 0", "field 'answer'")
    elif case == "json_not_list":
        path, read, expect = _write_json(tmp_path / "lvb_val.json", {"a": 1}), read_longvideobench, ("", "JSON list")
    else:
        path, read, expect = _write(tmp_path / "lvb_val.json", "[{]"), read_longvideobench, ("", "invalid JSON")
    with pytest.raises(RecordError) as e:
        read(tmp_path)
    message = str(e.value)
    assert message.startswith(path) and all(s in message for s in expect), message


# --------------------------------------------------------------------------------------
# write_jsonl -> read_jsonl, dispatch
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [False, True])
def test_write_read_round_trip(tmp_path, clip, relative):
    _put(clip, tmp_path / "MLVU" / "video" / "1_plotQA" / "movie.mp4")
    _write_json(tmp_path / "MLVU" / "json" / "1_plotQA.json", [
        {"video": "movie.mp4", "duration": 400.2, "question": "Who?", "candidates": ["a", "b", "c"], "answer": "c",
         "question_type": "plotQA"}])
    _put(clip, tmp_path / "videos" / "k1.mp4")
    _write_jsonl(tmp_path / "video_info.meta.jsonl", [
        {"key": "k1", "qa": [{"uid": 7, "question": "Q?\n(A) x\n(B) y", "answer": "B", "question_type": ["a", "b"],
                              "time_reference": "00:01-00:02"}]}])
    records = read_mlvu(tmp_path).records + read_lvbench(tmp_path).records
    records.append(VideoQARecord(uid="plain/1", question="Hidden?", options=("p", "q"), answer=None,
                                 video=records[0].video))
    out = tmp_path / "out" / "set.jsonl"
    assert write_jsonl(records, out, relative=relative) == 3
    assert os.listdir(out.parent) == ["set.jsonl"]  # no temporary file left behind
    first = json.loads(out.read_text().splitlines()[0])
    assert os.path.isabs(first["video"]) != relative and first["answer"] == "C"
    back = read_jsonl(out)
    assert back.records == records and back.num_skipped == 0
    assert [r.text() for r in back] == [r.text() for r in records]


def test_write_jsonl_refuses_frames_and_keeps_the_old_file(tmp_path):
    out = _write(tmp_path / "set.jsonl", "old\n")
    frames = VideoQARecord(uid="s/1", question="Q?", options=("a", "b"), answer=0,
                           frames=np.zeros((1, 2, 2, 3), np.uint8), timestamps=np.zeros(1))
    with pytest.raises(ValueError, match="s/1"):
        write_jsonl([frames], out)
    bad_meta = VideoQARecord(uid="s/2", question="Q?", options=("a", "b"), answer=0, video="/v.mp4",
                             meta={"arr": np.zeros(2)})
    with pytest.raises(ValueError, match="meta"):
        write_jsonl([bad_meta], out)
    assert open(out).read() == "old\n" and os.listdir(tmp_path) == ["set.jsonl"]


def test_read_benchmark_dispatch(tmp_path, clip):
    assert BENCHMARKS == ("videomme", "longvideobench", "lvbench", "mlvu", "jsonl")
    _put(clip, tmp_path / "v.mp4")
    path = _write_jsonl(tmp_path / "s.jsonl", [{"video": "v.mp4", "question": "Q?", "options": ["a", "b"],
                                                "answer": "A"}])
    assert read_benchmark("jsonl", path).records[0].uid == "s/1"
    with pytest.raises(ValueError, match="unknown benchmark"):
        read_benchmark("egoschema", tmp_path)
    with pytest.raises(FileNotFoundError, match="LongVideoBench"):
        read_benchmark("long_video_bench", tmp_path / "empty")
