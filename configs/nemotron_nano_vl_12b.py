"""Nemotron Nano VL 12B (nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL): the paper's video VLM, for shapes.

For ahead-of-time compilation without weights (`python -m train.aot`); real
weights come with their own config.json (`hybridvlm.loading.from_pretrained`).

- Language model: `configs/nemotron_h_12b.py` (62 layers, hidden 5120, vocab 131072).
- Vision tower: RADIO v2.5-H ("radio_v2.5-h" in the HF config's vision_config, with
  a separate video embedder for 2-frame tubelets): a ViT-H/16, width 1280, 32 layers,
  16 heads of 80, MLP 5120 (GELU), position table for 2048-pixel inputs (128 x 128
  patches). The HF config names only the RADIO version, not these sizes; they are
  the ViT-H/16 ones of that version. Class and register tokens: the RADIO defaults
  of `hybridvlm.radio.RadioConfig` (3 + 7), an assumption that touches 10 of the
  1034 tokens per tubelet.
- Between them (HF config fields): vit_hidden_size 1280, downsample_ratio 0.5 (2 x 2
  pixel shuffle: 5120 channels), projector_hidden_size 20480 (RMSNorm -> Linear 5120
  -> 20480 -> squared ReLU -> Linear -> 5120), force_image_size 512 (32 x 32 patches
  -> 256 visual tokens per tubelet), img_context_token_id 18.

`model` has the layout of `configs/finetune_synth.py`'s: text (LMConfig fields),
vision (RadioConfig fields) and the VLMConfig fields.
"""

import ml_collections

from configs import nemotron_h_12b


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        text=dict(nemotron_h_12b.get_config().model),
        vision=dict(
            hidden_size=1280,
            num_layers=32,
            num_heads=16,
            patch_size=16,
            max_img_size=2048,
            mlp_ratio=4.0,
            num_cls_tokens=3,
            num_registers=7,
            video_temporal_patch_size=2,
        ),
        image_token_id=18,
        downsample_ratio=0.5,
        projector_hidden_size=20480,
        image_size=512,
    ))
    return c
