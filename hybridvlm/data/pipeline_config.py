"""The input pipelines' static description: frame buckets, row lengths, model constants.

`PipelineConfig.for_model(vlm_config, batch_size=...)` takes the frame side,
temporal patch, visual tokens per tubelet, placeholder id, normalisation and
special ids from the model, so a pipeline cannot disagree with the model it
feeds. Every shape a batch can have follows from this config: one program per
frame bucket.
"""

from __future__ import annotations

import dataclasses
import math

from tokenizers import Tokenizer

from hybridvlm.data.records import LETTERS
from hybridvlm.radio import CLIP_MEAN, CLIP_STD
from hybridvlm.vlm import VLMConfig

# Nemotron Nano VL frame side when a checkpoint's config does not force one.
DEFAULT_IMAGE_SIZE = 512
# Row lengths are rounded up to a multiple of this (friendly to TPU/GPU tiles).
LENGTH_MULTIPLE = 64
# What to do with an example whose prompt is longer than its bucket's row.
LONG_PROMPTS = ("error", "skip")
# What a training row predicts at its last position: the option's letter, or the
# option's own first distinguishing token (a curriculum stage before letters).
TARGETS = ("letter", "option")


class PipelineError(ValueError):
    """A pipeline that cannot run as configured, or an example that breaks its contract
    (the message names the field, or the record's uid and the lengths)."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Static shapes and model constants of the training and evaluation pipelines.

    Attributes:
      batch_size: GLOBAL rows per batch; each process builds batch_size / process_count.
      buckets: frame buckets (frames, multiples of temporal_patch); a video of n frames
        goes to the smallest bucket >= n, shorter videos get masked padding tubelets.
      max_frames: frames sampled per video (default: the largest bucket); in-memory
        frames beyond it are subsampled uniformly.
      fps: frames per second sampled from video files; None: max_frames spread uniformly.
      image_size: frame side in pixels (frames are resized to image_size x image_size).
      temporal_patch: frames per tubelet; tokens_per_tubelet: visual tokens of one.
      image_token_id: the placeholder id; image_start_token / image_end_token: the
        strings around each tubelet's placeholders.
      pad_id, bos_id: padding id, and the id put first in every prompt (None: none).
      mean, std: per-channel normalisation (RGB), the vision tower's.
      frame_text_tokens: text tokens budgeted per frame (its "Frame i sampled at t
        seconds" label and the <img></img> tokens), for the row length.
      text_tokens: tokens budgeted for BOS and `record.text()` (question, options,
        instruction), for the row length.
      row_lengths: explicit row length per bucket (same order as buckets), overriding
        the budget above.
      long_prompts: "error" (default: a PipelineError naming the record's uid and the
        lengths) or "skip" (reported, counted in the stats, and skipped).
      target: "letter" (default: the answer letter's token) or "option" (the answer
        option's first token that tells the options apart, e.g. " red"; the row's
        choices are the options' such tokens). See `option_token_ids`.
      seed: shuffle seed (training).
      workers: grain worker processes (0: in this process, with `prefetch` batches
        read ahead by a thread); read_threads: threads decoding examples per worker.
      prefetch: batches buffered per worker (or by the thread when workers = 0).
      data_axis: the mesh axis, or axes, that batch rows are sharded over; axes the
        mesh does not have are left out (default: "data" and "fsdp", the
        data-parallel axes of `train.mesh`, as `hybridvlm.sharding` lays batches out).
    """

    batch_size: int
    buckets: tuple[int, ...] = (16, 32, 64)
    max_frames: int | None = None
    fps: float | None = None
    image_size: int = DEFAULT_IMAGE_SIZE
    temporal_patch: int = 2
    tokens_per_tubelet: int = 256
    image_token_id: int = 261
    image_start_token: str = "<img>"
    image_end_token: str = "</img>"
    pad_id: int = 0
    bos_id: int | None = 1
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    frame_text_tokens: int = 40
    text_tokens: int = 384
    row_lengths: tuple[int, ...] | None = None
    long_prompts: str = "error"
    target: str = "letter"
    seed: int = 0
    workers: int = 0
    read_threads: int = 2
    prefetch: int = 2
    data_axis: str | tuple[str, ...] = ("data", "fsdp")

    def __post_init__(self):
        object.__setattr__(self, "buckets", tuple(int(b) for b in self.buckets))
        if self.row_lengths is not None:
            object.__setattr__(self, "row_lengths", tuple(int(n) for n in self.row_lengths))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        bad = lambda field, why: PipelineError(f"PipelineConfig.{field}: {why}")
        if self.batch_size < 1:
            raise bad("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.temporal_patch < 1:
            raise bad("temporal_patch", f"must be >= 1, got {self.temporal_patch}")
        if not self.buckets:
            raise bad("buckets", "needs at least one frame bucket")
        if list(self.buckets) != sorted(set(self.buckets)):
            raise bad("buckets", f"must be increasing without repeats, got {list(self.buckets)}")
        for b in self.buckets:
            if b < 1 or b % self.temporal_patch:
                raise bad("buckets", f"{b} is not a positive multiple of temporal_patch={self.temporal_patch}")
        if not 1 <= self.frames <= self.buckets[-1]:
            raise bad("max_frames", f"must be in [1, {self.buckets[-1]}] (the largest bucket), got {self.max_frames}")
        if self.fps is not None and not self.fps > 0:
            raise bad("fps", f"must be > 0 (or None for uniform sampling), got {self.fps}")
        if self.image_size < 1 or self.tokens_per_tubelet < 1:
            raise bad("image_size", f"image_size and tokens_per_tubelet must be >= 1, got {self.image_size}, "
                                    f"{self.tokens_per_tubelet}")
        if self.row_lengths is not None and len(self.row_lengths) != len(self.buckets):
            raise bad("row_lengths", f"needs one length per bucket ({len(self.buckets)}), got {len(self.row_lengths)}")
        for bucket in self.buckets:
            if self.row_length(bucket) < self.visual_tokens(bucket):
                raise bad("row_lengths", f"bucket {bucket}: row length {self.row_length(bucket)} is shorter than its "
                                         f"{self.visual_tokens(bucket)} visual tokens")
        if self.long_prompts not in LONG_PROMPTS:
            raise bad("long_prompts", f"must be one of {LONG_PROMPTS}, got {self.long_prompts!r}")
        if self.target not in TARGETS:
            raise bad("target", f"must be one of {TARGETS}, got {self.target!r}")
        if self.workers < 0 or self.read_threads < 0 or self.prefetch < 0:
            raise bad("workers", f"workers, read_threads and prefetch must be >= 0, got {self.workers}, "
                                 f"{self.read_threads}, {self.prefetch}")
        if len(self.mean) not in (1, 3) or len(self.std) not in (1, 3):
            raise bad("mean", "mean and std need 1 or 3 values (RGB)")

    @classmethod
    def for_model(cls, vlm: VLMConfig, *, batch_size: int, **overrides) -> "PipelineConfig":
        """The pipeline for a VLM: its frame side (default 512 when the config forces none),
        temporal patch, tokens per tubelet, placeholder id and markers, normalisation,
        pad and BOS ids; `overrides` set any other field (buckets, row budgets, workers...)."""
        side = overrides.pop("image_size", None) or vlm.image_size or DEFAULT_IMAGE_SIZE
        kw = dict(
            image_size=side,
            temporal_patch=vlm.temporal_patch_size,
            tokens_per_tubelet=vlm.tokens_per_tubelet(side, side),
            image_token_id=vlm.image_token_id,
            image_start_token=vlm.image_start_token,
            image_end_token=vlm.image_end_token,
            pad_id=vlm.text.pad_token_id if vlm.text.pad_token_id is not None else 0,
            bos_id=vlm.text.bos_token_id,
            mean=tuple(vlm.vision.norm_mean),
            std=tuple(vlm.vision.norm_std),
        )
        kw.update(overrides)
        return cls(batch_size=batch_size, **kw)

    # ------------------------------------------------------------------ derived shapes
    @property
    def frames(self) -> int:
        """Frames sampled per video."""
        return self.buckets[-1] if self.max_frames is None else self.max_frames

    def tubelets(self, frames: int) -> int:
        """Tubelets of `frames` frames (the last one padded by repeating a frame)."""
        return math.ceil(frames / self.temporal_patch)

    def bucket_for(self, frames: int) -> int:
        """The smallest frame bucket that holds `frames` frames."""
        fits = [b for b in self.buckets if b >= frames]
        if not fits:
            raise PipelineError(f"a video of {frames} frames is longer than the largest bucket ({self.buckets[-1]})")
        return fits[0]

    def visual_tokens(self, bucket: int) -> int:
        """Placeholders (real or masked) of one row in `bucket`."""
        return self.tubelets(bucket) * self.tokens_per_tubelet

    def row_length(self, bucket: int) -> int:
        """Static row length (tokens) of `bucket`'s batches."""
        if self.row_lengths is not None:
            return self.row_lengths[self.buckets.index(bucket)]
        n = self.visual_tokens(bucket) + bucket * self.frame_text_tokens + self.text_tokens
        return -(-n // LENGTH_MULTIPLE) * LENGTH_MULTIPLE

    def local_batch_size(self, process_count: int) -> int:
        """Rows each of `process_count` processes builds."""
        if self.batch_size % process_count:
            raise PipelineError(f"PipelineConfig.batch_size: {self.batch_size} rows do not split over "
                                f"{process_count} processes")
        return self.batch_size // process_count


# ---------------------------------------------------------------------- tokenizer constants


def image_token(tok: Tokenizer, image_token_id: int) -> str:
    """The placeholder's string in `tok` (what video_prompt repeats)."""
    token = tok.id_to_token(image_token_id)
    if token is None:
        raise PipelineError(f"the tokenizer has no token with the model's image_token_id {image_token_id}")
    return token


def answer_token_ids(tok: Tokenizer, num_options: int = len(LETTERS)) -> tuple[int, ...]:
    """The ids of the option letters "A", "B", ... (each must be one token): the training
    targets, and the logits an evaluation compares at a prompt's last position."""
    ids = []
    for letter in LETTERS[:num_options]:
        enc = tok.encode(letter, add_special_tokens=False).ids
        if len(enc) != 1:
            raise PipelineError(f"the answer letter {letter!r} is {len(enc)} tokens in this tokenizer ({enc}); "
                                "the letter targets need one token each")
        ids.append(enc[0])
    return tuple(ids)


def option_token_ids(tok: Tokenizer, options) -> tuple[int, ...]:
    """Each option's first token that tells the options apart (the "option" target).

    Options are encoded as the prompt writes them, after a space (" red", " the red
    circle"); the position is the first one where the options' tokens are not all
    equal, and there they must be pairwise distinct (" the red circle" / " the blue
    ring" -> " red", " blue"). Raises PipelineError naming the options otherwise.
    """
    seqs = [tok.encode(" " + str(o), add_special_tokens=False).ids for o in options]
    if len(seqs) < 2:
        raise PipelineError(f"options {list(options)!r}: an option target needs at least 2 options")
    for p in range(max(len(q) for q in seqs)):
        column = [q[p] if p < len(q) else None for q in seqs]
        if len(set(column)) == 1:
            continue
        if None in column or len(set(column)) != len(column):
            break
        return tuple(int(i) for i in column)
    raise PipelineError(f"options {list(options)!r}: no token position tells every option apart "
                        "(the option target needs one; use target='letter')")
