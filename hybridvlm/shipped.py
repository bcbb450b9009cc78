"""Models shipped inside the package: `hybridvlm/pretrained/<name>/`, loadable by name.

    hybridvlm.from_pretrained("synth-video-qa-tiny")      # the name resolves to its directory
    resolve_checkpoint("runs/x/model")                    # a directory is returned as given
"""

from __future__ import annotations

import os

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
# What marks a shipped model's directory: an HF config.json or a hybridvlm checkpoint's params/.
_MARKERS = ("config.json", "params")


def pretrained_names() -> tuple[str, ...]:
    """Names of the models shipped in the package, sorted."""
    if not os.path.isdir(PRETRAINED_DIR):
        return ()
    return tuple(sorted(n for n in os.listdir(PRETRAINED_DIR)
                        if any(os.path.exists(os.path.join(PRETRAINED_DIR, n, m)) for m in _MARKERS)))


def resolve_checkpoint(name_or_path: str | os.PathLike, *, flag: str | None = None) -> str:
    """The directory of `name_or_path`: an existing directory as given, else a shipped
    model's name. FileNotFoundError (prefixed with `flag`) saying it is neither, and
    listing the shipped names."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if path in pretrained_names():
        return os.path.join(PRETRAINED_DIR, path)
    where = f"{flag}: " if flag else ""
    names = ", ".join(pretrained_names()) or "none"
    raise FileNotFoundError(f"{where}{path}: no such directory, and not the name of a shipped model ({names})")
