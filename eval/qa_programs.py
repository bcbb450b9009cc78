"""Compiled programs of an accuracy run: one vision + EVS program per (bucket, EVS rate),
one LM prefill program per (bucket, variant), compiled ahead of the first batch and reused.

    programs = QAPrograms(model, answer_ids)
    programs.compile(bucket, batch_shapes, variant, plan)             # AOT, once per key
    embedded = programs.embed(bucket, rate, batch)                    # ids, mask, h, columns
    out = programs.prefill(bucket, variant, embedded)                 # letter logits, top-1, kept columns

The split mirrors what a deployment does: the vision tower (and EVS) run once per video,
the LM prefill runs under the plan, and the first token is read from the prefill's last
position. Times of the two parts are measured separately (`timed_call`), so the prefill
speedup of a plan compares LM prefills only, and the time to first token adds the vision
part. `compilations` counts the programs built (a test checks it equals the number of
(bucket, plan) pairs).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eval.qa_variants import Variant
from hybridvlm.cache import Layout
from hybridvlm.vlm import NemotronHVLModel

EMBED_KEYS = ("input_ids", "attention_mask", "pixel_values_videos")


def with_evs(model: NemotronHVLModel, rate: float) -> NemotronHVLModel:
    """`model` with EVS at `rate` (the config's `video_pruning_rate`), sharing its weights."""
    if model.config.video_pruning_rate == rate:
        return model
    graphdef, state = nnx.split(model)
    twin = nnx.merge(graphdef, state)
    twin.config = model.config.replace(video_pruning_rate=rate)
    return twin


def timed_call(fn, *args):
    """(outputs, seconds) of one call, waiting for the results."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


class QAPrograms:
    """AOT-compiled embed / prefill programs keyed by (bucket, EVS rate) and (bucket, variant)."""

    def __init__(self, model: NemotronHVLModel, answer_ids):
        self.model = model
        self.answer_ids = jnp.asarray(answer_ids, jnp.int32)
        self._embed: dict[tuple[int, float], Any] = {}
        self._prefill: dict[tuple[int, Variant], Any] = {}
        self.compilations = 0
        self.compile_s = 0.0

    # ------------------------------------------------------------------ functions
    def _embed_fn(self, rate: float):
        graphdef, state = nnx.split(with_evs(self.model, rate))

        def embed(state, input_ids, attention_mask, pixel_values_videos):
            """-> ids (b, t'), mask (b, t'), h (b, t', d), columns (b, t') after EVS."""
            m = nnx.merge(graphdef, state)
            m.check_inputs(input_ids, attention_mask, pixel_values_videos=pixel_values_videos)
            return m.prepare(input_ids, attention_mask, pixel_values_videos, columns=True)

        return embed, state

    def _prefill_fn(self, plan):
        graphdef, state = nnx.split(self.model.language_model)
        answer_ids = self.answer_ids
        image_id = self.model.config.image_token_id

        def prefill(state, ids, mask, h, columns):
            """-> letter logits (b, letters) float32, top-1 token over the vocabulary (b,),
            columns of the tokens reaching the last layer (b, t'') in the prompt."""
            lm = nnx.merge(graphdef, state)
            visual = None if plan is None else ids == image_id
            lm.check_inputs(ids, mask, reduction=plan, visual_mask=visual, inputs_embeds=h)
            out, _, layout = lm.run_layers_with_layout(h, Layout.prompt(mask), reduction=plan, visual=visual)
            logits = lm.logits(out[:, -1:])[:, 0]  # the prompt ends at the last column of every row
            kept = jnp.take_along_axis(columns, layout.index, axis=1)
            return logits[:, answer_ids], jnp.argmax(logits, axis=-1).astype(jnp.int32), kept

        return prefill, state

    # ------------------------------------------------------------------ compile
    def compile(self, bucket: int, batch: dict, variant: Variant, plan) -> None:
        """Compiles (once) the bucket's embed program for the variant's EVS rate and the
        variant's prefill program, for batches shaped like `batch`."""
        ekey = (bucket, variant.evs)
        t0 = time.perf_counter()
        if ekey not in self._embed:
            fn, state = self._embed_fn(variant.evs)
            args = [state] + [jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype) for k in EMBED_KEYS]
            compiled = jax.jit(fn).lower(*args).compile()
            self._embed[ekey] = (compiled, state)
            self.compilations += 1
        pkey = (bucket, variant)
        if pkey not in self._prefill:
            embed_fn, state = self._embed_fn(variant.evs)
            shapes = jax.eval_shape(embed_fn, state, *[jax.ShapeDtypeStruct(batch[k].shape, batch[k].dtype)
                                                         for k in EMBED_KEYS])
            fn, lm_state = self._prefill_fn(plan)
            compiled = jax.jit(fn).lower(lm_state, *shapes).compile()
            self._prefill[pkey] = (compiled, lm_state)
            self.compilations += 1
        self.compile_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ run
    def embed(self, bucket: int, rate: float, batch: dict):
        """(embedded tuple, seconds) of the bucket's vision + EVS program."""
        compiled, state = self._embed[(bucket, rate)]
        return timed_call(compiled, state, *[batch[k] for k in EMBED_KEYS])

    def prefill(self, bucket: int, variant: Variant, embedded):
        """((letter logits, top-1, kept columns), seconds) of the variant's prefill."""
        compiled, state = self._prefill[(bucket, variant)]
        return timed_call(compiled, state, *embedded)
