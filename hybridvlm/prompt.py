"""Video (and image) prompts laid out as Nemotron Nano VL / Nemotron-H Omni expect them.

One chunk per tubelet (`temporal_patch` frames), each preceded by its frames'
labels, chunks joined by newlines, the question after the video:

    Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img><image>...<image></img>
    Frame 3 sampled at 1.00 seconds and frame 4 sampled at 1.50 seconds: <img><image>...<image></img>
    <question>

The reference processor prints timestamps from frame indices and the
source fps; we print the decoded frames' own presentation times.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def frame_label(first: int, timestamps: Sequence[float | None]) -> str:
    """"Frame i sampled at t seconds and frame i+1 sampled at ... : " for one tubelet."""
    parts = []
    for k, ts in enumerate(timestamps):
        word = "Frame" if k == 0 else "frame"
        at = "" if ts is None else f" sampled at {ts:.2f} seconds"
        parts.append(f"{word} {first + k}{at}")
    return " and ".join(parts) + ": "


def video_prompt(
    question: str,
    timestamps: Sequence[float] | np.ndarray | None,
    *,
    num_frames: int,
    temporal_patch: int,
    tokens_per_tubelet: int,
    image_token: str = "<image>",
    start_token: str = "<img>",
    end_token: str = "</img>",
) -> str:
    """The text of a video question; placeholders are `image_token` strings.

    Args:
      question: the user's question, placed after the video.
      timestamps: (num_frames,) seconds of the sampled frames, or None.
      num_frames: frames before tubelet padding (a short last tubelet lists
        only its real frames).
      temporal_patch: frames per tubelet; tokens_per_tubelet: placeholders each.
    """
    chunk = start_token + image_token * tokens_per_tubelet + end_token
    lines = []
    for first in range(0, num_frames, temporal_patch):
        idx = range(first, min(first + temporal_patch, num_frames))
        ts = [None if timestamps is None else float(timestamps[i]) for i in idx]
        lines.append(frame_label(first + 1, ts) + chunk)
    return "\n".join(lines) + "\n" + question


def image_prompt(question: str, *, tokens: int, image_token: str = "<image>", start_token: str = "<img>",
                 end_token: str = "</img>") -> str:
    """The text of an image question: one <img>...</img> chunk, then the question."""
    return start_token + image_token * tokens + end_token + "\n" + question
