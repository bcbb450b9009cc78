"""hybridvlm.tokenizer: the built-in byte and synth tokenizers."""

import numpy as np
import pytest

from hybridvlm.data import synth
from hybridvlm.prompt import video_prompt
from hybridvlm.tokenizer import (SYNTH_SPECIALS, SYNTH_VOCAB_SIZE, byte_tokenizer, named_tokenizer,
                                 synth_tokenizer)

TOK = synth_tokenizer()


def test_synth_specials_come_first_and_the_vocabulary_fits():
    assert [TOK.token_to_id(s) for s in SYNTH_SPECIALS] == list(range(len(SYNTH_SPECIALS)))
    assert TOK.token_to_id("<image>") == 5
    assert 262 + 100 < TOK.get_vocab_size() <= SYNTH_VOCAB_SIZE


@pytest.mark.parametrize("task", synth.TASKS)
def test_every_word_of_a_synth_question_is_one_token(task):
    record = synth.generate(5, 0, num_frames=16, task=task, size=16)
    text = record.text()
    enc = TOK.encode(text, add_special_tokens=False)
    # One token per word or punctuation mark: never a byte-level fallback inside a word.
    for token, (a, b) in zip(enc.tokens, enc.offsets):
        piece = text[a:b].strip()
        assert len(piece) <= 1 or piece.isalpha() or piece.isdigit() or piece == "'s", (token, piece)
    assert TOK.decode(enc.ids) == text
    # Option letters are single tokens, as the training targets need.
    for letter in "ABCD":
        assert len(TOK.encode(letter, add_special_tokens=False).ids) == 1


def test_a_tubelet_label_is_one_token_at_2_fps_up_to_the_longest_video():
    ts = np.arange(synth.MAX_FRAMES) / synth.FPS
    text = video_prompt("Q?", ts, num_frames=synth.MAX_FRAMES, temporal_patch=2, tokens_per_tubelet=3)
    ids = TOK.encode(text, add_special_tokens=False).ids
    tubelets = synth.MAX_FRAMES // 2
    # label + <img> + 3 placeholders + </img> per tubelet, newlines between, then "Q", "?".
    assert len(ids) == tubelets * 6 + (tubelets - 1) + 1 + 2
    odd = video_prompt("Q?", ts[:17], num_frames=17, temporal_patch=2, tokens_per_tubelet=1)
    assert len(TOK.encode(odd, add_special_tokens=False).ids) == 9 * 4 + 8 + 1 + 2  # short last tubelet too


def test_other_text_falls_back_to_bytes_and_round_trips():
    text = "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.33 seconds: Qué pasa? 🎬"
    enc = TOK.encode(text, add_special_tokens=False)
    assert TOK.decode(enc.ids) == text
    assert len(enc.ids) > 40  # the 3 fps label is not in the vocabulary: bytes


def test_the_synth_tokenizer_is_the_same_every_time():
    assert synth_tokenizer().to_str() == TOK.to_str()


def test_named_tokenizer():
    assert named_tokenizer("byte").get_vocab_size() == byte_tokenizer().get_vocab_size() == 262
    with pytest.raises(ValueError, match="unknown tokenizer 'words'"):
        named_tokenizer("words")
