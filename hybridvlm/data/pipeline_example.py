"""One record -> one model example: frames, pixels, tubelets, prompt ids, target.

The library version of the demo's single-example path (`eval/inputs.py`
`video_inputs` + `encode`): frames are sampled (a video file with PyAV's
`read_video`; in-memory frames subsampled uniformly), resized to the model's
side, normalised, packed into tubelets, and the record's text laid after the
video with `video_prompt`. A record whose video cannot be read becomes a
`Skipped` (reported and counted downstream), never an exception.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import av
import numpy as np
from tokenizers import Tokenizer

from hybridvlm.data.pipeline_config import (PipelineConfig, PipelineError, answer_token_ids, image_token,
                                             option_token_ids)
from hybridvlm.data.records import VideoQARecord
from hybridvlm.prompt import video_prompt
from hybridvlm.video import VideoError, frames_to_pixels, pack_tubelets, read_video

# Skip reasons (the keys of PipelineStats.skipped_by_kind).
UNREADABLE = "unreadable"  # missing or undecodable video (VideoError)
TOO_LONG = "too_long"  # prompt longer than its bucket's row (long_prompts="skip")
NO_ANSWER = "no_answer"  # training record without an answer


@dataclasses.dataclass(frozen=True)
class Example:
    """A prepared example, ready to be laid into a bucket's batch.

    ids: (n,) int32 prompt ids (BOS first), `tubelets * tokens_per_tubelet` placeholders.
    tubelets: (tubelets, temporal_patch * 3, S, S) float32 normalised pixels.
    bucket: its frame bucket; num_frames, timestamps (num_frames,) seconds.
    target: the token id the last position must predict (-1 without an answer): the
      answer letter's, or with cfg.target == "option" the answer option's own token.
    choices: the token ids the row's options are told apart by, one per option (the
      letters, or the options' tokens); accuracy takes the best-scored of these.
    """

    uid: str
    ids: np.ndarray
    tubelets: np.ndarray
    bucket: int
    num_frames: int
    timestamps: np.ndarray
    target: int
    answer: int
    num_options: int
    task: str
    meta: Mapping[str, Any]
    choices: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record the pipeline drops: uid, the video file (or ""), kind (see above), reason."""

    uid: str
    video: str
    kind: str
    reason: str

    def as_list(self) -> list[str]:
        return [self.uid, self.video, self.kind, self.reason]


def subsample_frames(frames: np.ndarray, timestamps: np.ndarray, max_frames: int):
    """At most `max_frames` frames, uniformly: the centre frame of each of max_frames equal
    groups (the rule `hybridvlm.video.sample_timestamps` uses); returns (frames, timestamps)."""
    t = frames.shape[0]
    if t <= max_frames:
        return frames, np.asarray(timestamps, np.float64)
    idx = ((np.arange(max_frames) + 0.5) * t / max_frames).astype(np.int64)
    return frames[idx], np.asarray(timestamps, np.float64)[idx]


def resize_frames(frames: np.ndarray, side: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, side, side, 3) uint8 with swscale's bicubic filter, the
    resize `read_video` applies while decoding (a no-op at the right size)."""
    if frames.shape[1:3] == (side, side):
        return frames
    out = np.empty((frames.shape[0], side, side, 3), np.uint8)
    for i, frame in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[i] = vf.to_ndarray(format="rgb24", width=side, height=side, interpolation="BICUBIC")
    return out


class PrepareExample:
    """record -> Example | Skipped (a picklable callable: it runs in grain's workers).

    train: a record without an answer is skipped (NO_ANSWER); the target is the answer
    letter's token id (or the answer option's, cfg.target == "option"), predicted at
    the prompt's last position.
    """

    def __init__(self, cfg: PipelineConfig, tokenizer: Tokenizer, *, train: bool):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.train = train
        self.image_token = image_token(tokenizer, cfg.image_token_id)
        self.letters = answer_token_ids(tokenizer)

    def frames(self, record: VideoQARecord):
        """(frames (T, S, S, 3) uint8, timestamps (T,)); raises VideoError for a bad file."""
        cfg = self.cfg
        if record.frames is not None:
            frames, times = subsample_frames(record.frames, record.timestamps, cfg.frames)
            return resize_frames(frames, cfg.image_size), times
        clip = read_video(record.video, max_frames=cfg.frames, fps=cfg.fps, size=(cfg.image_size, cfg.image_size))
        return clip.frames, clip.timestamps

    def prompt_ids(self, record: VideoQARecord, timestamps: np.ndarray) -> np.ndarray:
        """BOS + the ids of the video prompt with `record.text()` after the video."""
        cfg = self.cfg
        text = video_prompt(record.text(), timestamps, num_frames=len(timestamps), temporal_patch=cfg.temporal_patch,
                            tokens_per_tubelet=cfg.tokens_per_tubelet, image_token=self.image_token,
                            start_token=cfg.image_start_token, end_token=cfg.image_end_token)
        # No template specials: BOS is added here, once, whatever the tokenizer's post-processor.
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids if cfg.bos_id is None else [cfg.bos_id] + ids, np.int32)

    def __call__(self, record: VideoQARecord) -> Example | Skipped:
        cfg = self.cfg
        video = record.video or ""
        if self.train and record.answer is None:
            return Skipped(record.uid, video, NO_ANSWER, "no answer to train on")
        try:
            frames, times = self.frames(record)
        except VideoError as e:
            return Skipped(record.uid, e.path, UNREADABLE, e.reason)
        bucket = cfg.bucket_for(len(frames))
        tubelets = pack_tubelets(frames_to_pixels(frames, mean=cfg.mean, std=cfg.std), cfg.temporal_patch)
        ids = self.prompt_ids(record, times)
        laid = cfg.visual_tokens(bucket) - tubelets.shape[0] * cfg.tokens_per_tubelet + ids.size
        if laid > cfg.row_length(bucket):
            reason = (f"prompt of {ids.size} tokens ({laid} with the bucket's masked slots) is longer than the "
                      f"{cfg.row_length(bucket)}-token row of the {bucket}-frame bucket")
            if cfg.long_prompts == "error":
                raise PipelineError(f"record {record.uid!r}: {reason} (raise PipelineConfig.text_tokens or "
                                    "row_lengths, or set long_prompts='skip')")
            return Skipped(record.uid, video, TOO_LONG, reason)
        answer = -1 if record.answer is None else int(record.answer)
        if cfg.target == "option":
            try:
                choices = option_token_ids(self.tokenizer, record.options)
            except PipelineError as e:
                raise PipelineError(f"record {record.uid!r}: {e}") from None
        else:
            choices = self.letters[: len(record.options)]
        return Example(
            uid=record.uid, ids=ids, tubelets=tubelets, bucket=bucket, num_frames=len(frames),
            timestamps=np.asarray(times, np.float32), target=-1 if answer < 0 else choices[answer],
            answer=answer, num_options=len(record.options), task=record.task, meta=dict(record.meta),
            choices=tuple(choices),
        )
