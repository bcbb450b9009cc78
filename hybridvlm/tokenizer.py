"""Tokenizer loading: the `tokenizer.json` beside a checkpoint, via `tokenizers`."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(directory: str) -> Tokenizer | None:
    """Returns the directory's tokenizer, or None when it has no tokenizer.json."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
        raise ValueError(f"{path}: cannot load tokenizer ({e})") from None


# Special tokens of the embedded demo tokenizer, after the 259 byte-level ids.
BYTE_SPECIALS = ("<img>", "</img>", "<image>")


def byte_tokenizer() -> Tokenizer:
    """A byte-level tokenizer needing no files, for the embedded demo models.

    ids 0-2: <pad>, <s>, </s>; 3-258: the 256 bytes; 259-261: <img>,
    </img>, <image> (the video placeholder; vocab size 262).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return tok
