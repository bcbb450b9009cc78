"""Finetuning on SynthVideoQA: `python -m train.finetune --config configs/finetune_synth.py --workdir DIR`.

Every field can be overridden on the command line (`--config.steps=500`,
`--config.mesh.tensor=2`, `--config.reduction.shape=step --config.reduction.budget=0.25`);
`python -m train.finetune --help` lists them. With the defaults the job needs nothing
prepared: SynthVideoQA clips are generated on the fly from `seed`, and the model is a
fresh initialisation of `model` (a small hybrid video VLM that trains on a laptop CPU).

Fields:
  init: None (fresh `model`), an HF checkpoint directory of the Nemotron Nano VL family,
    or a hybridvlm checkpoint (`python -m hybridvlm.convert`); `model` is then ignored.
  data.train / data.eval: "synth" (generated from `seed`: train and validation splits of
    `data.train_examples` / `data.eval_examples` clips of `data.frames` frames,
    `data.frame_size` pixels), "synth:DIR" (a split prepared by
    `python -m hybridvlm.data.prepare_synth` with the same frames and size), "jsonl:FILE"
    (the local format), or "<benchmark>:DIR" (videomme, longvideobench, lvbench, mlvu);
    data.eval "" = no evaluation.
  data.frames: frames per generated video; several (comma separated) are taken in turn.
  data.buckets: frame buckets, comma separated (a static shape, and a plan, per bucket).
  data.frame_text_tokens / data.text_tokens: a row's text budget (per frame label; question,
    options and instruction), which sets each bucket's static row length.
  data.target: what the last position learns to predict: "letter" (the answer's option
    letter) or "option" (the answer option's own first distinguishing token, " red": a
    curriculum stage before letters; accuracy is then over the options' tokens).
  data.distractors: generated training clips show each event that does not answer the
    question with this probability (1.0: all, the real task; 0.0: only the answer events);
    a curriculum raises it stage by stage. Validation always shows every event.
  data.tasks: generated training clips of these SynthVideoQA tasks only, comma separated, taken
    in turn ("" = all four); validation keeps all four (its eval_accuracy/<task> rows).
  data.turns: generated training clips put up to this many extra question-answer turns from
    the clip's ground truth before the question ("What color is the ring? red", one per line;
    `hybridvlm.data.synth.qa_turns`), as a multi-turn conversation about one image does in
    instruction tuning: with text_loss they add that many supervised lookups per clip
    (0 = none). Validation has none.
  tokenizer: the built-in tokenizer of a fresh model, "byte" or "synth" (whole words of
    SynthVideoQA prompts; a prompt several times shorter); an `init` checkpoint brings its own.
  reduction.shape: None (no reduction) or a plan of `reduction.plan.NAMED` ("step" is the
    paper's progressive schedule) at reduction.budget (the kept share of visual-token
    layer-compute, e.g. 0.25); one static plan per frame bucket.
  optim.freeze: parts kept fixed, comma separated, among vision, projector, lm, lm_embed.
  text_loss: weight of an added cross-entropy on the text after the video (question,
    options, instruction; up to data.text_tokens per row), 0 = answer only. Its words name
    what the video holds, so it gives many grounded targets per clip where the answer gives
    one (a curriculum aid; reported as text_loss, apart from loss).
  remat: None or a `hybridvlm.remat.REMAT_POLICIES` name (per LM layer and per vision tower block).
  mesh.data / mesh.fsdp / mesh.sequence / mesh.tensor: device mesh axis sizes, one may be -1
    (the rest). sequence > 1 splits each prompt along the sequence for the LM's layers
    (context parallelism, `hybridvlm.context`): every bucket's row must divide into that
    many blocks, and a plan's stages keep up to sequence - 1 more tokens (`shard_plan`).
  compilation_cache: a directory for JAX's persistent compilation cache (None: off).
  distributed: None (initialise `jax.distributed` when the environment describes a
    multi-process job), True or False.
"""

import ml_collections
from ml_collections import config_dict

from configs import tiny_lm, tiny_vlm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init = config_dict.placeholder(str)
    # A small hybrid video VLM: 2-block RADIO-style tower (patch 16) on 64x64 frames,
    # 2-frame tubelets -> 4x4 patches -> pixel shuffle -> 4 tokens per tubelet, and a
    # 6-layer LM with all three layer kinds.
    c.model = ml_collections.ConfigDict(dict(
        # tiny_lm's LM (byte-level vocabulary) with one attention layer fewer and longer SSD chunks.
        text=dict(tiny_lm.get_config().model, pattern="M-M*-M", chunk_size=64),
        vision=dict(tiny_vlm.get_config().vision, max_img_size=64),
        image_token_id=261,  # "<image>" in the byte tokenizer
        projector_hidden_size=128,
        image_size=64,
    ))
    c.tokenizer = "byte"  # a fresh model's: "byte" or "synth" (hybridvlm.tokenizer.TOKENIZERS)
    c.steps = 200
    c.batch_size = 8
    c.log_every = 10
    c.eval_every = 100
    c.checkpoint_every = 50
    c.keep_checkpoints = 3
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, sequence=1, tensor=1))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=20, end_lr_factor=0.1, weight_decay=0.05, b1=0.9, b2=0.95,
        clip_norm=1.0, accumulate=1, freeze=""))
    c.data = ml_collections.ConfigDict(dict(
        train="synth", eval="synth", frames="16", frame_size=64, buckets="16", train_examples=20_000,
        eval_examples=64, workers=0, frame_text_tokens=40, text_tokens=384, target="letter",
        distractors=1.0, tasks="", turns=0))
    c.reduction = ml_collections.ConfigDict(dict(shape=config_dict.placeholder(str),
                                                 budget=config_dict.placeholder(float)))
    c.remat = config_dict.placeholder(str)
    c.text_loss = 0.0
    # Activations' dtype on float32 master weights; "auto": bfloat16 on TPU/GPU, float32 on CPU.
    c.compute_dtype = "auto"
    c.distributed = config_dict.placeholder(bool)
    c.tensorboard = True
    # JAX's persistent compilation cache directory (None: off); a restarted or resumed job
    # then loads its compiled programs instead of compiling them again.
    c.compilation_cache = config_dict.placeholder(str)
    return c
