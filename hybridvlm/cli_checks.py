"""Checks of command-line inputs, for scripts to run before they build a model.

Each check returns what it checked, or raises `cli.InputError` (exit status 1)
naming the flag and the file ("--video: clip.mp4: empty file (0 bytes)"), or
`cli.UsageError` (exit status 2) for a value out of range
("--config.max_frames: must be >= 1, got -1").
"""

from __future__ import annotations

import os

from hybridvlm import loading
from hybridvlm.cli import InputError, UsageError
from hybridvlm.hf_import import CheckpointError
from hybridvlm.tokenizer import TOKENIZER_FILE
from hybridvlm.video import VideoError, read_image

# Frames are decoded to this size by the probe: enough to prove the file decodes, cheap for 4K video.
_PROBE_SIZE = (16, 16)


def require(ok: bool, flag: str, reason: str) -> None:
    """UsageError "<flag>: <reason>" unless ok."""
    if not ok:
        raise UsageError(f"{flag}: {reason}")


def at_least(flag: str, value, low):
    require(value is not None and value >= low, flag, f"must be >= {low}, got {value}")
    return value


def in_range(flag: str, value, low, high, *, low_open: bool = False):
    """low <= value <= high (low < value with low_open)."""
    ok = value is not None and (value > low if low_open else value >= low) and value <= high
    require(ok, flag, f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return value


def input_file(flag: str, path: str) -> str:
    """An existing, readable, non-empty regular file."""
    if not os.path.exists(path):
        raise InputError(f"{flag}: {path}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{flag}: {path}: is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{flag}: {path}: not readable (permission denied)")
    if os.path.getsize(path) == 0:
        raise InputError(f"{flag}: {path}: empty file (0 bytes)")
    return path


def media_file(flag: str, path: str) -> str:
    """A video or image file whose first frame decodes (a cheap probe: one small frame)."""
    input_file(flag, path)
    try:
        read_image(path, size=_PROBE_SIZE)
    except VideoError as e:
        raise InputError(f"{flag}: {e}") from None
    return path


def checkpoint_dir(flag: str, path: str, *, tokenizer: bool = False) -> str:
    """A directory holding an HF or hybridvlm checkpoint (and a tokenizer.json if asked)."""
    try:
        loading.checkpoint_format(path)
    except (FileNotFoundError, NotADirectoryError, CheckpointError) as e:
        raise InputError(f"{flag}: {e}") from None
    if tokenizer and not os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
        raise InputError(f"{flag}: {path}: no {TOKENIZER_FILE} next to the weights (needed to encode the prompt)")
    return path


def output_file(flag: str, path: str) -> str:
    """A file the script may create or replace: not a directory, in a directory it can create or write."""
    if os.path.isdir(path):
        raise InputError(f"{flag}: {path}: is a directory (expected a file path)")
    _creatable(flag, os.path.dirname(os.path.abspath(path)))
    return path


def output_dir(flag: str, path: str, *, new: bool = False) -> str:
    """A directory the script may write into (new=True: one it creates, so it must not exist)."""
    if os.path.exists(path):
        if new:
            raise InputError(f"{flag}: {path}: already exists (give a new directory)")
        if not os.path.isdir(path):
            raise InputError(f"{flag}: {path}: is a file, not a directory")
    _creatable(flag, os.path.abspath(path))
    return path


def _creatable(flag: str, directory: str) -> None:
    """`directory` exists and is writable, or its nearest existing ancestor is a writable directory."""
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError(f"{flag}: {directory}: cannot create it, {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: {probe}: not writable (permission denied)")
