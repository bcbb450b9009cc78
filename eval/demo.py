"""Demo: prompt -> answer with a hybrid Nemotron-H model, with prefill timing.

    python -m eval.demo                                   # embedded tiny UNTRAINED model
    python -m eval.demo --checkpoint DIR --prompt "..."   # an HF or hybridvlm checkpoint
    python -m eval.demo --config.model.hidden_size=256    # override config fields

With no arguments it builds the tiny random model of `configs/tiny_lm.py`
and a byte-level tokenizer: nothing is downloaded or prepared, and the
answer is noise (the model is untrained); it shows that the whole path
(prefill, cache hand-off, jitted decoding) runs. Video input comes with the
VLM issue.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import configs
import hybridvlm
from hybridvlm.tokenizer import byte_tokenizer

_CONFIG = config_flags.DEFINE_config_file("config", configs.path("tiny_lm"), "ml_collections config file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF or hybridvlm checkpoint directory (default: tiny random model).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (default: the config's).")
_JSON = flags.DEFINE_string("json", None, "Also write the result as JSON to this path.")


def load_model(cfg, checkpoint):
    """Returns (model, tokenizer, label)."""
    if checkpoint is None:
        model = hybridvlm.NemotronHForCausalLM(hybridvlm.LMConfig(**cfg.model), rngs=nnx.Rngs(cfg.seed))
        return model, byte_tokenizer(), "tiny random model (UNTRAINED: output is noise)"
    model = hybridvlm.from_pretrained(checkpoint)
    tok = hybridvlm.load_tokenizer(checkpoint)
    if tok is None:
        raise app.UsageError(f"{checkpoint}: no tokenizer.json next to the weights")
    return model, tok, checkpoint


def run(cfg, checkpoint=None, prompt=None) -> dict:
    model, tok, label = load_model(cfg, checkpoint)
    prompt = cfg.prompt if prompt is None else prompt
    ids = tok.encode(prompt).ids
    if model.config.bos_token_id is not None:
        ids = [model.config.bos_token_id] + ids
    input_ids = jnp.asarray([ids], jnp.int32)
    mask = jnp.ones_like(input_ids)

    # Prefill alone, compiled ahead of time so the timing excludes compilation.
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).prefill(i, m, i.shape[1])[0])
    t0 = time.perf_counter()
    compiled = prefill.lower(state, input_ids, mask).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled(state, input_ids, mask).block_until_ready()
    prefill_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = model.generate(input_ids, mask, max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p)
    out = jax.device_get(out)[0].tolist()
    generate_s = time.perf_counter() - t0
    stops = set(model.config.eos_token_id)
    answer_ids = [t for t in out if t != model.config.pad_token_id]
    answer_ids = answer_ids[: next((i for i, t in enumerate(answer_ids) if t in stops), len(answer_ids))]
    return dict(
        model=label, backend=jax.default_backend(), prompt=prompt, prompt_tokens=len(ids),
        answer=tok.decode(answer_ids), answer_ids=out, prefill_s=prefill_s,
        prefill_compile_s=compile_s, generate_s=generate_s,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = run(_CONFIG.value, _CHECKPOINT.value, _PROMPT.value)
    print(f"model    : {result['model']}")
    print(f"backend  : {result['backend']}")
    print(f"prompt   : {result['prompt']!r} ({result['prompt_tokens']} tokens)")
    print(f"answer   : {result['answer']!r}")
    print(f"prefill  : {result['prefill_s'] * 1e3:.1f} ms (compiled ahead: {result['prefill_compile_s']:.2f} s)")
    print(f"generate : {result['generate_s']:.2f} s for {len(result['answer_ids'])} steps incl. compilation")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
