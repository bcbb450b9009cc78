"""Files are written whole or not at all."""

import json
import os

import pytest

from hybridvlm import atomic


def test_write_json_replaces_the_file_whole(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2, "b": [1.5]})
    assert json.loads(path.read_text()) == {"a": 2, "b": [1.5]}
    assert os.listdir(path.parent) == ["out.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_json(path, {"old": True})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"bad": object()})
    with pytest.raises(ValueError):
        atomic.write_json(path, {"nan": float("nan")}, allow_nan=False)

    def half(tmp):
        with open(tmp, "w") as f:
            f.write('{"half":')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_atomic(path, half)
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["out.json"]


def test_new_files_get_the_usual_permissions(tmp_path):
    path = tmp_path / "x.txt"
    atomic.write_text(path, "hi")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert path.read_text() == "hi"
