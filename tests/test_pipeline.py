"""The grain pipelines (hybridvlm.data.pipeline): buckets, layout, skips, shards, order,
Orbax resume, a batch through the tiny VLM, and eval.bench_data --runlocal."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import tiny_vlm
from eval.bench_data import random_model
from eval.inputs import tiny_vlm_config
from hybridvlm.data.pipeline import (IGNORE, PipelineConfig, PipelineError, answer_token_ids, eval_pipeline,
                                     pad_to_bucket, restore_args, restore_iterator, save_args, save_iterator,
                                     train_pipeline)
from hybridvlm.data.pipeline_config import option_token_ids
from hybridvlm.data.records import VideoQARecord
from hybridvlm.prompt import video_prompt
from hybridvlm.tokenizer import byte_tokenizer
from hybridvlm.video import write_test_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = byte_tokenizer()
IMG = 261  # "<image>" in byte_tokenizer()
# Frame counts of the in-memory records: 11 > max_frames (8) is subsampled.
COUNTS = (1, 2, 3, 4, 5, 8, 11, 6, 2, 7, 4, 3, 8)


def _record(i: int, frames: int, *, answer: int | None = 0, video: str | None = None) -> VideoQARecord:
    if video is not None:
        return VideoQARecord(uid=f"v{i}", question=f"What moves in clip {i}?", options=("a square", "a ball"),
                             answer=answer, task="motion", video=video)
    rng = np.random.default_rng(i)
    return VideoQARecord(
        uid=f"r{i}", question=f"What color is shape {i}?", options=("red", "green", "blue")[: 2 + i % 2],
        answer=None if answer is None else i % (2 + i % 2), task="color",
        frames=rng.integers(0, 256, (frames, 24, 40, 3), dtype=np.uint8),  # resized to 32x32
        timestamps=np.arange(frames) * 0.5 + 0.25, meta={"index": i})


SOURCE = [_record(i, n) for i, n in enumerate(COUNTS)]


def _cfg(**kw) -> PipelineConfig:
    base = dict(batch_size=2, buckets=(4, 8), image_size=32, tokens_per_tubelet=4, text_tokens=160, read_threads=1,
                prefetch=1)
    return PipelineConfig(**{**base, **kw})


def _batches(ds, n: int | None = None) -> list[dict]:
    it = iter(ds)
    try:
        return list(it) if n is None else [next(it) for _ in range(n)]
    finally:
        it.close()


def _prompt(record: VideoQARecord, timestamps, cfg: PipelineConfig) -> str:
    return video_prompt(record.text(), timestamps, num_frames=len(timestamps), temporal_patch=cfg.temporal_patch,
                        tokens_per_tubelet=cfg.tokens_per_tubelet, image_token="<image>")


def test_config_for_the_tiny_vlm_and_its_checks():
    cfg = PipelineConfig.for_model(tiny_vlm_config(tiny_vlm.get_config()), batch_size=8, buckets=(16, 32, 64))
    assert (cfg.image_size, cfg.temporal_patch, cfg.tokens_per_tubelet, cfg.image_token_id) == (128, 2, 16, 261)
    assert (cfg.pad_id, cfg.bos_id, cfg.frames) == (0, 1, 64)
    assert cfg.row_length(16) % 64 == 0 and cfg.row_length(16) >= 8 * 16 + 16 * cfg.frame_text_tokens
    assert cfg.bucket_for(1) == 16 and cfg.bucket_for(17) == 32 and cfg.bucket_for(64) == 64
    with pytest.raises(PipelineError, match="buckets: 5 is not a positive multiple of temporal_patch=2"):
        _cfg(buckets=(5, 8))
    with pytest.raises(PipelineError, match="do not split over 3 processes"):
        _cfg().local_batch_size(3)
    assert answer_token_ids(TOK, 3) == (35, 36, 37)


def test_batches_never_mix_buckets_and_use_the_smallest_that_fits():
    cfg = _cfg()
    seen = {}
    for b in _batches(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1))):
        bucket = int(b["bucket"][0])
        assert (b["bucket"] == bucket).all()
        assert b["pixel_values_videos"].shape == (2, bucket // 2, 6, 32, 32)
        assert b["input_ids"].shape == (2, cfg.row_length(bucket)) and b["timestamps"].shape == (2, bucket)
        for r in np.flatnonzero(b["valid"]):
            seen[str(b["uid"][r])] = (bucket, int(b["num_frames"][r]), b["timestamps"][r])
    assert sorted(seen) == sorted(r.uid for r in SOURCE)
    for i, n in enumerate(COUNTS):
        bucket, frames, times = seen[f"r{i}"]
        assert frames == min(n, 8) and bucket == (4 if frames <= 4 else 8)
        if n == 11:  # uniform subsample: the centre frame of each of 8 groups
            idx = ((np.arange(8) + 0.5) * 11 / 8).astype(int)
            np.testing.assert_allclose(times, idx * 0.5 + 0.25)


def test_padding_masks_labels_and_the_prompt_text():
    cfg = _cfg()
    batches = _batches(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1)))
    by_uid = {r.uid: r for r in SOURCE}
    letters = answer_token_ids(TOK)
    for b in batches:
        bucket = int(b["bucket"][0])
        L = b["input_ids"].shape[1]
        np.testing.assert_array_equal(b["loss_mask"], b["labels"] != IGNORE)
        for r in range(2):
            ids, mask, labels = b["input_ids"][r], b["attention_mask"][r], b["labels"][r]
            if not b["valid"][r]:  # padding row: masked placeholders only, no label
                assert not mask.any() and (labels == IGNORE).all() and b["uid"][r] == ""
                assert (ids == IMG).sum() == cfg.visual_tokens(bucket)
                assert (b["pixel_values_videos"][r] == 0).all()
                continue
            rec = by_uid[str(b["uid"][r])]
            n = int(b["num_frames"][r])
            real = ids[mask]
            start = L - real.size
            assert mask[start:].all() and not mask[:start].any()  # [pad][masked slots] | [row prompt]
            n_tub = -(-n // 2)
            masked_slots = (ids[:start] == IMG).sum()
            assert masked_slots == (bucket // 2 - n_tub) * 4 and (ids[: start - masked_slots] == 0).all()
            assert (real == IMG).sum() == n_tub * 4
            # The prompt: BOS, then the video prompt with record.text() after the video.
            text = TOK.decode(real[1:].tolist(), skip_special_tokens=False)
            assert real[0] == 1 and text == _prompt(rec, b["timestamps"][r][:n], cfg)
            assert text.endswith("\n" + rec.text())
            # Labels: only the last column, the answer letter (what the last position predicts).
            assert labels[-1] == letters[rec.answer] and (labels[:-1] == IGNORE).all()
            # Text labels: the next token of every text column after the video.
            tl = b["text_labels"][r]
            after = start + np.flatnonzero(real == IMG)[-1] + 1
            assert (tl[:after] == IGNORE).all() and tl[-1] == IGNORE
            assert (tl[after:-1] == ids[after + 1:]).all()
            assert ids[after] == TOK.token_to_id("</img>")
            assert TOK.decode(tl[after:-1].tolist(), skip_special_tokens=False) == "\n" + rec.text()
            k = len(rec.options)  # the row's choices: its options' letters
            assert b["choice_ids"][r, :k].tolist() == list(letters[:k]) and (b["choice_ids"][r, k:] == -1).all()
            assert b["answer"][r] == rec.answer and b["num_options"][r] == len(rec.options)
            assert b["meta"][r] == {"index": int(rec.uid[1:])} and b["task"][r] == "color"
            assert np.isnan(b["timestamps"][r][n:]).all()


def test_option_target_predicts_the_answer_options_own_token():
    # " red" / " green" / " blue" are told apart by their first letter (byte tokens), the
    # motion options " a square" / " a ball" by their third token.
    cfg = _cfg(target="option")
    batches = _batches(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1)))
    by_uid = {r.uid: r for r in SOURCE}
    rows = 0
    for b in batches:
        for r in np.flatnonzero(b["valid"]):
            rec = by_uid[str(b["uid"][r])]
            firsts = [TOK.token_to_id(o[0]) for o in rec.options]
            k = len(rec.options)
            assert b["choice_ids"][r, :k].tolist() == firsts and (b["choice_ids"][r, k:] == -1).all()
            assert b["labels"][r, -1] == firsts[rec.answer]
            rows += 1
    assert rows == len(SOURCE)
    assert option_token_ids(TOK, ("a square", "a ball")) == (TOK.token_to_id("s"), TOK.token_to_id("b"))
    for bad in [("red", "red"), ("ab", "ac", "bc"), ("red",)]:
        with pytest.raises(PipelineError, match="option"):
            option_token_ids(TOK, bad)
    with pytest.raises(PipelineError, match="target: must be one of"):
        _cfg(target="word")


def test_long_prompts_are_an_error_or_skipped_and_counted():
    cfg = _cfg(row_lengths=(64, 96))
    with pytest.raises(PipelineError, match=r"record 'r0': prompt of \d+ tokens .* longer than the 64-token row"):
        _batches(eval_pipeline(SOURCE[:2], cfg, tokenizer=TOK, shard=(0, 1)))
    it = iter(eval_pipeline(SOURCE[:2], _cfg(row_lengths=(64, 96), long_prompts="skip"), tokenizer=TOK,
                            shard=(0, 1)))
    assert list(it) == []
    assert it.stats.skipped_by_kind == {"too_long": 2} and set(it.stats.skipped_records) == {"r0", "r1"}


def test_unreadable_videos_are_reported_counted_and_skipped(tmp_path, caplog):
    good = [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")]
    write_test_clip(good[0], num_frames=8, fps=8, height=32, width=48)
    write_test_clip(good[1], num_frames=3, fps=8, height=32, width=48)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(4096))
    missing = str(tmp_path / "missing.mp4")
    source = [_record(0, 0, video=good[0]), _record(1, 0, video=missing), _record(2, 0, video=str(corrupt)),
              _record(3, 0, video=good[1])]
    cfg = _cfg(batch_size=1)
    with caplog.at_level(logging.WARNING, logger="hybridvlm.data.pipeline_output"):
        it = iter(eval_pipeline(source, cfg, tokenizer=TOK, shard=(0, 1)))
        got = list(it)
    assert [(str(b["uid"][0]), int(b["num_frames"][0]), int(b["bucket"][0])) for b in got] == [("v0", 8, 8),
                                                                                              ("v3", 3, 4)]
    assert it.stats.skipped == 2 and it.stats.skipped_by_kind == {"unreadable": 2} and it.stats.examples == 2
    assert it.stats.skipped_records["v1"] == f"{missing}: no such file"
    assert it.stats.skipped_records["v2"].startswith(f"{corrupt}: ")
    warned = "\n".join(r.getMessage() for r in caplog.records)
    assert "'v1'" in warned and missing in warned and "no such file" in warned and str(corrupt) in warned
    # Training goes on past them, every epoch (each occurrence counted, each record logged once).
    caplog.clear()
    it = iter(train_pipeline(source, cfg, tokenizer=TOK, shard=(0, 1)))
    uids = [str(next(it)["uid"][0]) for _ in range(6)]
    it.close()
    assert set(uids) == {"v0", "v3"} and it.stats.skipped >= 4 and it.stats.skipped_by_kind.keys() == {"unreadable"}
    assert len([r for r in caplog.records if "'v1'" in r.getMessage()]) == 1
    # A training source with nothing readable is an error, not an endless loop.
    with pytest.raises(PipelineError, match="examples in a row were skipped"):
        _batches(train_pipeline(source[1:3], cfg, tokenizer=TOK, shard=(0, 1)), 1)


def test_shards_are_disjoint_and_cover_the_source():
    cfg = _cfg()
    parts = []
    for shard in [(0, 2), grain.sharding.ShardOptions(shard_index=1, shard_count=2)]:
        batches = _batches(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=shard))
        assert all(b["input_ids"].shape[0] == 1 for b in batches)  # batch_size 2 over 2 processes
        parts.append([str(u) for b in batches for u in b["uid"][b["valid"]]])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(r.uid for r in SOURCE)
    assert set(parts[0]) == {f"r{i}" for i in range(0, len(SOURCE), 2)}
    # Training shards read only their own slice.
    uids = {str(u) for b in _batches(train_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(1, 2)), 12) for u in b["uid"]}
    assert uids <= set(parts[1])
    with pytest.raises(PipelineError, match="shard 3 of 20 is empty"):
        train_pipeline(SOURCE[:3], cfg, tokenizer=TOK, shard=(3, 20))
    assert _batches(eval_pipeline(SOURCE[:3], _cfg(batch_size=20), tokenizer=TOK, shard=(3, 20))) == []


def test_training_shuffle_is_deterministic_by_seed_and_reshuffles_each_epoch():
    def order(seed, n=13):
        ds = train_pipeline(SOURCE, _cfg(batch_size=1, seed=seed), tokenizer=TOK, shard=(0, 1))
        return [str(b["uid"][0]) for b in _batches(ds, n)]

    first = order(0, 26)
    assert first == order(0, 26)
    assert first != order(1, 26)
    assert sorted(first[:13]) == sorted(r.uid for r in SOURCE)  # one epoch = each record once
    assert first[:13] != first[13:]  # the next epoch in another order
    assert first[:13] != [r.uid for r in SOURCE]


def test_eval_order_is_fixed_and_each_example_is_scored_once():
    cfg = _cfg(batch_size=4)

    def run():
        it = iter(eval_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1)))
        batches = list(it)
        return batches, it.stats

    a, stats = run()
    b, _ = run()
    assert [list(x["uid"]) for x in a] == [list(x["uid"]) for x in b]
    for x, y in zip(a, b):
        for key in ("input_ids", "attention_mask", "pixel_values_videos", "labels"):
            np.testing.assert_array_equal(x[key], y[key])
    uids = [str(u) for x in a for u in x["uid"][x["valid"]]]
    assert sorted(uids) == sorted(r.uid for r in SOURCE) and len(uids) == len(set(uids))
    # Full batches first, in reading order; then each bucket's partial batch, padding rows flagged last.
    partial = [x for x in a if not x["valid"].all()]
    assert len(partial) == 2 and [int(x["bucket"][0]) for x in partial] == [4, 8]
    assert all(x is y for x, y in zip(a[-2:], partial))
    for x in partial:
        n = int(x["valid"].sum())
        assert x["valid"][:n].all() and not x["valid"][n:].any() and (x["uid"][n:] == "").all()
    assert stats.examples == len(SOURCE) and stats.padding_rows == 4 * len(a) - len(SOURCE)
    assert stats.batches == len(a) and stats.skipped == 0


def _assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            if key == "meta":
                assert list(x[key]) == list(y[key])
            else:
                np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_round_trip_through_orbax(tmp_path, workers):
    cfg = _cfg(batch_size=2, seed=3, workers=workers)
    ds = train_pipeline(SOURCE, cfg, tokenizer=TOK, shard=(0, 1))
    it = iter(ds)
    for _ in range(3):
        next(it)
    if workers == 0:  # a bucket holds a partial batch at the save
        assert any(it.get_state()["parent"]["buffers"].values())
    save_iterator(tmp_path / "alone", 3, it)
    # Beside a model state, in one manager (what train/ does).
    mngr = ocp.CheckpointManager(tmp_path / "run")
    model_state = {"w": np.arange(6.0).reshape(2, 3)}
    mngr.save(3, args=save_args(it, state=ocp.args.StandardSave(model_state)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(4)]
    stats = it.stats.to_dict()
    it.close()

    resumed = restore_iterator(tmp_path / "alone", iter(ds))
    _assert_batches_equal([next(resumed) for _ in range(4)], expected)
    assert resumed.stats.to_dict() == stats
    resumed.close()

    again = iter(ds)
    restored = mngr.restore(3, args=restore_args(again, state=ocp.args.StandardRestore(model_state)))
    np.testing.assert_array_equal(restored["state"]["w"], model_state["w"])
    _assert_batches_equal([next(again) for _ in range(4)], expected)
    again.close()
    mngr.close()


def test_a_batch_runs_through_the_tiny_vlm_and_each_row_equals_the_row_alone():
    # configs/tiny_vlm.py's model (as eval.inputs.build_tiny_vlm builds it) with a Mamba, an
    # attention and an MLP layer, its weights drawn with numpy (eval.bench_data.random_model:
    # the same program, without ~15 s of per-shape random-init compiles on 2 cores).
    model_cfg = tiny_vlm.get_config()
    model_cfg.model.update(pattern="M*-")
    vlm = random_model(tiny_vlm_config(model_cfg), seed=0)
    # Rows of 4 and 2 frames (2 and 1 tubelets) in the 4-frame bucket.
    rng = np.random.default_rng(0)
    recs = [VideoQARecord(uid=f"r{i}", question=f"What color is shape {i}?", options=("red", "green", "blue"),
                          answer=i, frames=rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8),
                          timestamps=np.arange(n) * 0.5) for i, n in enumerate((4, 2))]
    cfg = PipelineConfig.for_model(vlm.config, batch_size=2, buckets=(4, 6), row_lengths=(320, 384))
    (batch,) = _batches(eval_pipeline(recs, cfg, tokenizer=TOK, shard=(0, 1)))
    assert batch["valid"].all() and list(batch["num_frames"]) == [4, 2]

    graphdef, state = nnx.split(vlm)
    fwd = jax.jit(lambda s, i, a, p: nnx.merge(graphdef, s)(i, attention_mask=a, pixel_values_videos=p))
    got = np.asarray(fwd(state, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                         jnp.asarray(batch["pixel_values_videos"])))
    assert np.isfinite(got).all()
    # The same rows laid out in the next bucket (multi-process lockstep) give the same logits.
    big = pad_to_bucket(batch, 6, cfg)
    bigger = np.asarray(fwd(state, jnp.asarray(big["input_ids"]), jnp.asarray(big["attention_mask"]),
                            jnp.asarray(big["pixel_values_videos"])))
    assert bigger.shape[1] == 384 and np.isfinite(bigger).all()
    for key in ("labels", "text_labels", "choice_ids"):  # targets move with their rows' text
        width = batch[key].shape[1] if key == "choice_ids" else None
        np.testing.assert_array_equal(big[key][:, -width if width else -batch[key].shape[1]:], batch[key])
    rows = [batch["input_ids"][r][batch["attention_mask"][r]] for r in range(2)]
    assert rows[0].size > rows[1].size  # different real lengths in one bucket
    for r, row in enumerate(rows):
        n_tub = int(np.sum(row == IMG)) // cfg.tokens_per_tubelet
        alone = np.asarray(fwd(state, jnp.asarray(row[None]), np.ones((1, row.size), bool),
                               jnp.asarray(batch["pixel_values_videos"][r : r + 1, :n_tub])))[0]
        np.testing.assert_allclose(got[r, -row.size:], alone, atol=2e-5, rtol=0, err_msg=f"row {r}")
        np.testing.assert_allclose(bigger[r, -row.size:], alone, atol=2e-5, rtol=0, err_msg=f"row {r}, 6 frames")


def test_bench_data_runlocal(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "eval.bench_data", "--runlocal", "--steps", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "pipeline:" in proc.stdout and "train step:" in proc.stdout and "CPU cores" in proc.stdout
    data = json.loads(out.read_text())
    assert data["pipeline_examples_per_s"] > 0 and data["train_step_examples_per_s"] > 0
    assert data["ratio"] == pytest.approx(data["pipeline_examples_per_s"] / data["train_step_examples_per_s"])
    bad = subprocess.run([sys.executable, "-m", "eval.bench_data", "--batch", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --batch: must be >= 1, got 0"
