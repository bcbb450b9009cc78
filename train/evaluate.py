"""Validation during finetuning: answer-token loss and multiple-choice accuracy over an eval split.

    eval_step = layout.jit_eval(make_eval_step(graphdef, rest, answer_ids=ids, plan_for_bucket=plans))
    metrics = evaluate(eval_step, state.params, eval_pipeline(...))   # {"eval_loss", "eval_accuracy", ...}

The same forward as training (compute dtype, the bucket's reduction plan, only the answer
positions' logits), without gradients. Padding rows of the eval pipeline (`valid` False)
are not counted; every readable example is scored exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train.loss import answer_loss
from train.step import STEP_KEYS, compute_model_fn, plan_lookup


def make_eval_step(graphdef, rest, *, answer_ids, plan_for_bucket=None, compute_dtype=jnp.bfloat16,
                   max_answer_tokens: int = 1, sequence=None):
    """eval_step(params, batch) -> dict of float32 sums: loss_sum, tokens, correct, and per
    row (b,): row_correct, row_tokens.

    Arguments as `train.step.make_train_step`; params are the float32 master weights."""
    lookup = plan_lookup(plan_for_bucket)
    answer_ids = tuple(int(i) for i in answer_ids)
    to_model = compute_model_fn(graphdef, rest, compute_dtype)

    def eval_step(params, batch):
        batch = {k: jnp.asarray(batch[k]) for k in STEP_KEYS if k in batch}
        model = to_model(params)
        frames = batch["pixel_values_videos"].shape[1] * model.config.temporal_patch_size
        _, aux = answer_loss(model, batch, answer_ids=answer_ids, reduction=lookup(frames),
                             max_answer_tokens=max_answer_tokens, per_row=True, sequence=sequence)
        return aux

    return eval_step


def evaluate(eval_step, params, batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Runs eval_step over every batch; returns eval_loss (mean cross-entropy per answer
    token), eval_accuracy (share of answers whose top option letter is right),
    eval_examples (answer tokens scored) and, when the batches name their rows' tasks,
    eval_accuracy/<task> for each."""
    sums = dict(loss_sum=0.0, tokens=0.0, correct=0.0)
    per_task: dict[str, list[float]] = {}
    for batch in batches:
        out = jax.device_get(eval_step(params, {k: batch[k] for k in STEP_KEYS if k in batch}))
        for k in sums:
            sums[k] += float(np.asarray(out[k]))
        for task, hit, n in zip(batch.get("task", ()), np.asarray(out["row_correct"]), np.asarray(out["row_tokens"])):
            if n > 0 and task:
                cell = per_task.setdefault(str(task), [0.0, 0.0])
                cell[0] += float(hit)
                cell[1] += float(n)
    n = max(sums["tokens"], 1.0)
    result = dict(eval_loss=sums["loss_sum"] / n, eval_accuracy=sums["correct"] / n, eval_examples=sums["tokens"])
    result.update({f"eval_accuracy/{task}": c[0] / c[1] for task, c in sorted(per_task.items())})
    return result
