"""Tiny randomly initialised video VLM: the embedded default of `python -m eval.demo`.

RADIO-style tower (2 blocks, width 64, patch 16) on 128x128 frames, 2-frame
tubelets -> 8x8 patches -> pixel shuffle -> 16 tokens per tubelet, projector,
and the tiny hybrid LM of tiny_lm.py. Untrained: the answer is noise; it
shows the whole path (video decode, tubelets, vision, scatter, prefill,
decoding) running in seconds on a laptop CPU.
"""

import ml_collections
from ml_collections import config_dict

from configs import tiny_lm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = tiny_lm.get_config()
    c.vision = dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        patch_size=16,
        max_img_size=128,
        mlp_ratio=2.0,
        num_cls_tokens=2,
        num_registers=2,
        video_temporal_patch_size=2,
    )
    c.image_token_id = 261  # "<image>" in hybridvlm.tokenizer.byte_tokenizer()
    c.projector_hidden_size = 128
    c.image_size = 128
    c.max_frames = 16
    # Frames per second to sample; unset (None): max_frames spread uniformly over the clip.
    # A typed placeholder, so that --config.fps=1.0 can set it.
    c.fps = config_dict.placeholder(float)
    c.question = "Question: what moves in the video, and where does it go? Answer:"
    c.max_new_tokens = 24
    return c
