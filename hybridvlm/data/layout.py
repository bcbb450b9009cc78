"""Prepared examples -> one static-shape batch of a frame bucket (numpy, host side).

Rows follow `hybridvlm.batch.pad_video_batch`: `[pad][masked slots][row prompt]`,
right-aligned, so every row's prompt ends at the last column, where the logits
predict the answer letter. Rows missing from a partial batch are *padding rows*
(`valid` False): only masked placeholders, attention_mask all False, no label.

Batch keys (b rows, L = cfg.row_length(bucket), Bt = bucket tubelets, F = bucket frames):
  model inputs (placed on devices by `to_device`):
    input_ids (b, L) int32, attention_mask (b, L) bool,
    pixel_values_videos (b, Bt, temporal_patch * 3, S, S) float32 (padding tubelets zero),
    labels (b, L) int32: next-token targets aligned with the logits (labels[r, t] is what
      logits[r, t] should predict): the answer letter's id at the last column, -100 elsewhere
      (and on rows without an answer), loss_mask (b, L) bool = labels != -100,
    text_labels (b, L) int32: next-token targets of the text after the video (its question,
      options and instruction: text_labels[r, c] = input_ids[r, c + 1] for the columns from
      the last `</img>` to the one before the last), -100 elsewhere; an optional dense
      loss on them (`train.loss.answer_loss(text_weight=...)`) teaches what the video holds,
    choice_ids (b, MAX_CHOICES) int32: the token ids of the row's options (`Example.choices`:
      the letters, or the options' own tokens), -1 past its options; accuracy is the share
      of rows whose best-scored choice is the label,
    valid (b,) bool: False on padding rows.
  host-side metadata (numpy):
    uid (b,) str, answer (b,) int32 (-1: none), num_options (b,) int32, task (b,) str,
    bucket (b,) int32 (frames), num_frames (b,) int32, timestamps (b, F) float32
    (NaN past num_frames), meta (b,) object (the records' meta mappings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybridvlm.batch import pad_video_batch
from hybridvlm.data.pipeline_config import PipelineConfig
from hybridvlm.data.pipeline_example import Example
from hybridvlm.data.records import LETTERS

IGNORE = -100  # labels value where no loss is taken
MAX_CHOICES = len(LETTERS)  # options a question can have
MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "labels", "loss_mask", "text_labels", "choice_ids",
              "valid")
HOST_KEYS = ("uid", "answer", "num_options", "task", "bucket", "num_frames", "timestamps", "meta")


def _empty_row(cfg: PipelineConfig):
    c = cfg.temporal_patch * 3
    return np.zeros((0,), np.int32), np.zeros((0, c, cfg.image_size, cfg.image_size), np.float32)


def _layout(cfg: PipelineConfig, rows, bucket: int):
    return pad_video_batch(rows, bucket=cfg.tubelets(bucket), tokens_per_tubelet=cfg.tokens_per_tubelet,
                           image_token_id=cfg.image_token_id, pad_token_id=cfg.pad_id, length=cfg.row_length(bucket))


def text_labels(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int) -> np.ndarray:
    """(b, L) int32: each row's next-token targets over the text after its video (see the
    module doc); a row without placeholders has them over its whole prompt."""
    b, length = input_ids.shape
    out = np.full((b, length), IGNORE, np.int32)
    for r in range(b):
        real = np.flatnonzero(attention_mask[r])
        if real.size < 2:
            continue
        visual = np.flatnonzero((input_ids[r] == image_token_id) & attention_mask[r])
        start = visual[-1] + 1 if visual.size else real[0]
        out[r, start:length - 1] = input_ids[r, start + 1:]
    return out


def collate(examples: Sequence[Example], bucket: int, cfg: PipelineConfig, rows: int) -> dict[str, np.ndarray]:
    """The batch of `examples` (all of `bucket`), padded to `rows` rows with padding rows."""
    if len(examples) > rows:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {rows} rows")
    for e in examples:
        if e.bucket != bucket:
            raise ValueError(f"record {e.uid!r} of the {e.bucket}-frame bucket in a {bucket}-frame batch")
    n = len(examples)
    laid = [(e.ids, e.tubelets) for e in examples] + [_empty_row(cfg)] * (rows - n)
    input_ids, attention_mask, pixels = _layout(cfg, laid, bucket)
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    timestamps = np.full((rows, bucket), np.nan, np.float32)
    choice_ids = np.full((rows, MAX_CHOICES), -1, np.int32)
    for r, e in enumerate(examples):
        if e.target >= 0:
            labels[r, -1] = e.target
        timestamps[r, : e.num_frames] = e.timestamps
        choice_ids[r, : len(e.choices)] = e.choices
    pad = rows - n
    meta = np.empty((rows,), object)
    for r in range(rows):
        meta[r] = examples[r].meta if r < n else {}
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values_videos=pixels.astype(np.float32, copy=False),
        labels=labels,
        loss_mask=labels != IGNORE,
        text_labels=text_labels(input_ids, attention_mask, cfg.image_token_id),
        choice_ids=choice_ids,
        valid=np.arange(rows) < n,
        uid=np.asarray([e.uid for e in examples] + [""] * pad, dtype=str),
        answer=np.asarray([e.answer for e in examples] + [-1] * pad, np.int32),
        num_options=np.asarray([e.num_options for e in examples] + [0] * pad, np.int32),
        task=np.asarray([e.task for e in examples] + [""] * pad, dtype=str),
        bucket=np.full((rows,), bucket, np.int32),
        num_frames=np.asarray([e.num_frames for e in examples] + [0] * pad, np.int32),
        timestamps=timestamps,
        meta=meta,
    )


def padding_batch(bucket: int, cfg: PipelineConfig, rows: int) -> dict[str, np.ndarray]:
    """A batch of padding rows only (a process with no data left, in lockstep with others)."""
    return collate([], bucket, cfg, rows)


def pad_to_bucket(batch: Mapping[str, Any], bucket: int, cfg: PipelineConfig) -> dict[str, np.ndarray]:
    """The same rows laid out in a larger frame bucket (more masked slots, a longer row).

    Used when processes of a multi-host job must agree on one bucket per step: each row's
    real tokens, tubelets, labels and timestamps are kept; its logits do not change.
    """
    old = int(batch["bucket"][0])
    if old == bucket:
        return dict(batch)
    if bucket < old:
        raise ValueError(f"cannot lay a {old}-frame batch into the smaller {bucket}-frame bucket")
    old_len, new_len = batch["input_ids"].shape[1], cfg.row_length(bucket)
    rows, real_len = [], []
    for r in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][r][batch["attention_mask"][r]]
        n_tub = int(np.sum(ids == cfg.image_token_id)) // cfg.tokens_per_tubelet
        rows.append((ids, batch["pixel_values_videos"][r, :n_tub]))
        real_len.append(ids.size)
    input_ids, attention_mask, pixels = _layout(cfg, rows, bucket)
    labels = np.full(input_ids.shape, IGNORE, np.int32)
    for r, n in enumerate(real_len):
        labels[r, new_len - n:] = batch["labels"][r, old_len - n:]
    timestamps = np.full((len(rows), bucket), np.nan, np.float32)
    timestamps[:, :old] = batch["timestamps"]
    out = dict(batch)
    out.update(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixels, labels=labels,
               loss_mask=labels != IGNORE, text_labels=text_labels(input_ids, attention_mask, cfg.image_token_id),
               bucket=np.full((len(rows),), bucket, np.int32), timestamps=timestamps)
    return out
