"""Autoregressive generation with static shapes.

One `jax.jit` program runs the prefill and a `lax.while_loop` of one-token
decode steps over a preallocated cache. Only the padded prompt shape, the
number of new tokens, the stop tokens and greedy-vs-sampling are static, so
a second prompt of the same padded length reuses the compiled program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def sample_token(logits, rng, *, greedy: bool, temperature, top_p):
    """Picks one token per row.

    Args:
      logits: (b, vocab) float32.
      rng: PRNG key (unused when greedy).
      greedy: static; argmax when True.
      temperature: scalar > 0; top_p: scalar in (0, 1], nucleus mass kept.
    Returns:
      (b,) int32 token ids.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    # Nucleus: drop tokens once the mass of strictly more likely ones reaches top_p.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(rng, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "stop_tokens", "pad_token_id", "reduction")
)
def _generate(graphdef, state, input_ids, attention_mask, inputs, rng, temperature, top_p, *,
              max_new_tokens, greedy, stop_tokens, pad_token_id, reduction):
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    if reduction is not None:
        inputs = dict(inputs, reduction=reduction)
    logits, cache = model.prefill(input_ids, attention_mask, t + max_new_tokens, **inputs)
    stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
    pick = functools.partial(sample_token, greedy=greedy, temperature=temperature, top_p=top_p)

    def emit(step, out, done, logits, rng):
        rng, key = jax.random.split(rng)
        tok = jnp.where(done, pad_token_id, pick(logits, key))
        out = out.at[:, step].set(tok)
        done = done | jnp.isin(tok, stops)
        return out, done, tok, rng

    out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32)
    out, done, tok, rng = emit(0, out, jnp.zeros((b,), bool), logits, rng)

    def cond(carry):
        step, _, done, _, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, out, done, tok, cache, rng = carry
        logits, cache = model.decode(tok[:, None], cache)
        out, done, tok, rng = emit(step, out, done, logits[:, 0], rng)
        return step + 1, out, done, tok, cache, rng

    carry = (jnp.int32(1), out, done, tok, cache, rng)
    return jax.lax.while_loop(cond, body, carry)[1]


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    reduction=None,
    **inputs,
):
    """Generates up to `max_new_tokens` tokens after each (left-padded) prompt.

    Args:
      model: a `NemotronHForCausalLM` or `NemotronHVLModel` (anything with
        `text_config`, `check_inputs`, `prefill` and `decode`).
      input_ids: (b, t) int prompt ids, left-padded to a common length.
      attention_mask: (b, t), 1 on tokens, 0 on padding; None = all ones.
      max_new_tokens: number of decoding steps (static).
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_p: nucleus sampling mass in (0, 1] (sampling only).
      stop_tokens: ids that end a row (kept in the output); default: the
        config's eos ids. Pass () to never stop early.
      pad_token_id: fills the slots after a row stopped; default: config's.
      rng: PRNG key for sampling; default `jax.random.key(0)`.
      reduction: optional static ReductionPlan applied in the prefill; the
        cache then holds, per attention layer, only the tokens that reached
        it, and Mamba layers carry their state (decoding is unchanged).
      **inputs: further model inputs passed to `model.prefill` and
        `model.check_inputs` (e.g. `visual_mask` for the LM,
        `pixel_values_videos` for the VLM).
    Returns:
      (b, max_new_tokens) int32: the new tokens only.
    """
    cfg = model.text_config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    stop = tuple(cfg.eos_token_id if stop_tokens is None else (int(s) for s in stop_tokens))
    pad = cfg.pad_token_id if pad_token_id is None else int(pad_token_id)
    inputs = {k: v for k, v in inputs.items() if v is not None}
    # Concrete inputs: shapes, visual slots per row and the plan are checked
    # here, before anything is compiled.
    model.check_inputs(input_ids, attention_mask, reduction=reduction, **inputs)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, input_ids, attention_mask, inputs,
        jax.random.key(0) if rng is None else rng,
        jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens), greedy=temperature == 0,
        stop_tokens=stop, pad_token_id=pad, reduction=reduction,
    )
