"""The small video VLM shipped in the package (`hybridvlm.from_pretrained("synth-video-qa-tiny")`).

Trained from scratch on SynthVideoQA on a 2-core CPU with `python -m train.finetune`
(the exact commands are in hybridvlm/pretrained/synth-video-qa-tiny/MODEL_CARD.md):

    python -m train.finetune --config configs/synth_video_qa_tiny.py --workdir RUN

RADIO-style tower (2 blocks, width 96, patch 8) on 64x64 frames at 2 fps, 2-frame
tubelets -> 8x8 patches -> pixel shuffle -> 16 visual tokens per tubelet (256 at 32
frames, 512 at 64), a projector, and a 9-layer hybrid LM (Mamba-2, attention and MLP layers in turn)
over the `synth` tokenizer (each SynthVideoQA word and tubelet label one token, so visual
tokens are ~90% of a prompt, as in real long videos). Every field of
configs/finetune_synth.py can be overridden the same way.
"""

import ml_collections

from configs import finetune_synth
from hybridvlm.tokenizer import SYNTH_VOCAB_SIZE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = finetune_synth.get_config()
    c.tokenizer = "synth"
    c.model = ml_collections.ConfigDict(dict(
        text=dict(
            vocab_size=SYNTH_VOCAB_SIZE, hidden_size=128, pattern="M*-M*-M*-",
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=384,
            mamba_num_heads=8, mamba_head_dim=32, ssm_state_size=32, n_groups=2, conv_kernel=4, chunk_size=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=(2,),
        ),
        vision=dict(hidden_size=96, num_layers=2, num_heads=4, patch_size=8, max_img_size=64, mlp_ratio=2.0,
                    num_cls_tokens=2, num_registers=2, video_temporal_patch_size=2),
        image_token_id=5,  # "<image>" in the synth tokenizer
        projector_hidden_size=256,
        image_size=64,
    ))
    c.steps = 3000
    c.batch_size = 8
    c.log_every = 25
    c.eval_every = 250
    c.checkpoint_every = 100
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.optim.end_lr_factor = 0.05
    c.data.frames = "16"
    c.data.buckets = "16,32,64"
    c.data.frame_size = 64
    c.data.train_examples = 1_000_000
    c.data.eval_examples = 256
    # A tubelet's label, <img> and </img> are 3 synth tokens; question, options and
    # instruction < 40.
    c.data.frame_text_tokens = 2
    c.data.text_tokens = 48
    return c
