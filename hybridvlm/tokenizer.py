"""Tokenizers: the `tokenizer.json` beside a checkpoint (via `tokenizers`), and the two
built-in ones of the embedded models, which need no files.

    byte_tokenizer()    bytes only (vocab 262): the untrained demo models
    synth_tokenizer()   bytes plus every word and 2 fps frame label of SynthVideoQA
                        prompts as one token (vocab `SYNTH_VOCAB_SIZE`): the small
                        trained video model
    named_tokenizer(name)   one of `TOKENIZERS` by name
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from hybridvlm.data import records, synth
from hybridvlm.prompt import frame_label
from hybridvlm.shipped import pretrained_names, resolve_checkpoint

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(directory: str) -> Tokenizer | None:
    """Returns the tokenizer of a checkpoint directory (or a shipped model's name), or None
    when it has no tokenizer.json."""
    if not os.path.isdir(directory) and directory in pretrained_names():
        directory = resolve_checkpoint(directory)
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


# ----------------------------------------------------------------------------- synth words

SYNTH_SPECIALS = ("<pad>", "<s>", "</s>", "<img>", "</img>", "<image>")  # ids 0-5
SYNTH_VOCAB_SIZE = 768  # the model's embedding rows: the vocabulary rounded up (room to grow)
# A whole tubelet label ("Frame 7 sampled at 3.00 seconds and frame 8 sampled at 3.50
# seconds: ", `hybridvlm.prompt.frame_label`) is one pre-token; the rest is split as GPT-2 does.
_LABEL = r"Frame \d+(?: sampled at \d+\.\d+ seconds)?(?: and frame \d+(?: sampled at \d+\.\d+ seconds)?)*: "
_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _synth_texts() -> list[str]:
    """Every text a SynthVideoQA prompt is made of: the labels of every 2-frame tubelet and
    of every single frame (a short last tubelet) up to the longest video at 2 fps, each
    task's question with every shape and colour, its options and the instruction."""
    at = lambda i: i / synth.FPS
    texts = [frame_label(i + 1, [at(i), at(i + 1)]) for i in range(0, synth.MAX_FRAMES, 2)]
    texts += [frame_label(i + 1, [at(i)]) for i in range(synth.MAX_FRAMES)]
    fmt = records.DEFAULT_OPTION_FORMAT
    for q in synth.QUESTIONS.values():
        for shape in synth.SHAPES:
            for color in synth.COLORS:
                texts.append(q.format(shape=shape, color=color))
                texts.append(fmt.format(letter="A", option=f"the {color} {shape}"))
    texts += [fmt.format(letter=letter, option=o) for letter in records.LETTERS[:4] for o in synth.COUNT_OPTIONS]
    texts.append(records.DEFAULT_INSTRUCTION)
    return texts


def synth_tokenizer() -> Tokenizer:
    """Byte-level BPE whose vocabulary holds every word of SynthVideoQA prompts whole.

    ids 0-5: <pad>, <s>, </s>, <img>, </img>, <image>; 6-261: the 256 bytes; then the
    words, sorted: each 2 fps tubelet label as one token (so a tubelet costs 3 text tokens:
    label, <img>, </img>, and the visual tokens dominate the sequence as in real videos),
    and GPT-2 style pre-tokens ("Ġcircle", "Ġ12", ...). With no merges and
    `ignore_merges`, a pre-token in the vocabulary is one id and any other text falls back
    to bytes, so every string still encodes (labels at other frame rates, byte by byte).
    Built from code alone: the same ids on every machine.
    """
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LABEL + "|" + _GPT2), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = sorted({w for text in _synth_texts() for line in text.split("\n") for w, _ in pre.pre_tokenize_str(line)}
                   - set(alphabet))
    vocab = {t: i for i, t in enumerate((*SYNTH_SPECIALS, *alphabet, *words))}
    if len(vocab) > SYNTH_VOCAB_SIZE:  # a guard for whoever extends the word list
        raise AssertionError(f"synth vocabulary of {len(vocab)} tokens exceeds SYNTH_VOCAB_SIZE={SYNTH_VOCAB_SIZE}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SYNTH_SPECIALS))
    return tok


TOKENIZERS = {"byte": byte_tokenizer, "synth": synth_tokenizer}


def named_tokenizer(name: str) -> Tokenizer:
    """The built-in tokenizer `name` (a key of TOKENIZERS); ValueError naming the choices."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]()
