"""Video prompt layout against strings produced by the reference processor
(transformers' NemotronH Omni `replace_video_token`, recorded in the fixture)."""

import json
import os

import pytest

from hybridvlm.prompt import video_prompt

CASE = os.path.join(os.path.dirname(__file__), "fixtures", "vlm", "omni_video", "case.json")
EXAMPLES = json.load(open(CASE))["processor_video_text_examples"]


def _reference(key):
    return next(v for k, v in EXAMPLES.items() if k.startswith(key))


@pytest.mark.parametrize(
    "key,timestamps,num_frames",
    [
        ("6 frames, fps=2", [0.0, 0.5, 1.0, 1.5, 2.0, 2.5], 6),
        # the reference computes index * int(1000 / fps) / 1000 for its labels
        ("6 frames, fps=30", [i * 33 / 1000 for i in (0, 15, 30, 45, 60, 75)], 6),
        ("5 frames", [0.0, 0.5, 1.0, 1.5, 2.0], 5),
        ("6 frames, no fps", None, 6),
    ],
)
def test_video_prompt_matches_reference_processor(key, timestamps, num_frames):
    text = video_prompt("Q?", timestamps, num_frames=num_frames, temporal_patch=2, tokens_per_tubelet=4)
    assert text == _reference(key) + "\nQ?"


def test_custom_placeholder_strings():
    text = video_prompt("why", [0.0, 1.0], num_frames=2, temporal_patch=2, tokens_per_tubelet=2,
                        image_token="<P>", start_token="[", end_token="]")
    assert text == "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 1.00 seconds: [<P><P>]\nwhy"
