"""Files written whole or not at all: a temporary file in the same directory, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Calls write(tmp_path), then renames tmp_path onto `path` (created folders included).

    The rename is atomic on POSIX file systems, so a reader (or a crash) sees the
    old file or the new one, never half of one. The temporary file is removed if
    `write` fails. The new file gets the usual permissions (0666 minus the umask).
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to path atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def write_json(path: str | os.PathLike, obj, **dumps_kwargs) -> None:
    """json.dumps(obj, indent=2, **dumps_kwargs) written to path atomically (nothing written if it fails)."""
    write_text(path, json.dumps(obj, **{"indent": 2, **dumps_kwargs}))
