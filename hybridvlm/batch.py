"""Static-shape batches of video prompts whose videos have different lengths.

Every row of a batch holds the same number of visual slots (its *frame
bucket*), so a reduction plan's keep counts and every shape are static. A
video shorter than the bucket is padded with blank tubelets, and the
placeholders of those tubelets are *masked*: they sit at the left of the row
with the padding (attention_mask 0), are never attended or scored, and every
selector drops them first. Left of the real tokens they are exact no-ops (the
reference zeroes padded positions, and Mamba starts from a zero state), so a
row's logits equal those of the row alone.

    row r:  [pad ...][masked slots of the missing tubelets][row r's own prompt]

`NemotronHVLModel` fills a row's real placeholders from its first tubelets and
its masked ones from the padding tubelets (`NemotronHVLModel._slots`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def frame_bucket(num_tubelets: int, buckets: Sequence[int]) -> int:
    """The smallest bucket (in tubelets) that holds `num_tubelets`."""
    fits = [b for b in sorted(buckets) if b >= num_tubelets]
    if not fits:
        raise ValueError(f"a video of {num_tubelets} tubelets is longer than the largest frame bucket "
                         f"({max(buckets)} tubelets)")
    return fits[0]


def pad_video_batch(rows: Sequence[tuple[Sequence[int], np.ndarray]], *, bucket: int, tokens_per_tubelet: int,
                    image_token_id: int, pad_token_id: int, length: int | None = None):
    """Lays out one video prompt per row in a static-shape batch.

    Args:
      rows: (prompt ids, tubelets) per row; the ids hold one placeholder
        (`image_token_id`) per visual token of that row's tubelets
        (n_r, temporal_patch * 3, H, W), n_r <= bucket, same H, W for all.
      bucket: tubelets per row after padding (the frame bucket).
      tokens_per_tubelet: visual tokens of one tubelet.
      image_token_id, pad_token_id: the placeholder and padding ids.
      length: static row length; default: the longest row after padding.
    Returns:
      input_ids (b, length) int32, attention_mask (b, length) bool (False on
      padding and masked slots), pixel_values_videos (b, bucket, C, H, W)
      (padding tubelets are zeros).
    """
    if not rows:
        raise ValueError("pad_video_batch needs at least one row")
    laid, pixels = [], []
    for r, (ids, tubelets) in enumerate(rows):
        ids = np.asarray(ids, np.int32)
        tubelets = np.asarray(tubelets)
        n = tubelets.shape[0]
        if tubelets.ndim != 4 or tubelets.shape[1:] != np.shape(rows[0][1])[1:]:
            raise ValueError(f"row {r}: tubelets must be (n, C, H, W) like row 0's {np.shape(rows[0][1])}, "
                             f"got {tubelets.shape}")
        if n > bucket:
            raise ValueError(f"row {r}: {n} tubelets do not fit the frame bucket of {bucket}")
        placeholders = int(np.sum(ids == image_token_id))
        if placeholders != n * tokens_per_tubelet:
            raise ValueError(f"row {r}: the prompt has {placeholders} placeholders (id {image_token_id}) but "
                             f"{n} tubelets give {n * tokens_per_tubelet} visual tokens")
        masked = np.full(((bucket - n) * tokens_per_tubelet,), image_token_id, np.int32)
        laid.append((np.concatenate([masked, ids]), masked.size))
        pad = np.zeros((bucket - n,) + tubelets.shape[1:], tubelets.dtype)
        pixels.append(np.concatenate([tubelets, pad]))
    longest = max(row.size for row, _ in laid)
    length = longest if length is None else length
    if length < longest:
        raise ValueError(f"length={length} is shorter than the longest padded row ({longest} tokens)")
    input_ids = np.full((len(rows), length), pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for r, (row, num_masked) in enumerate(laid):
        input_ids[r, length - row.size:] = row
        mask[r, length - row.size + num_masked:] = True
    return input_ids, mask, np.stack(pixels)
