"""The train step: answer-token loss under a per-bucket reduction plan, AdamW update.

    graphdef, params, rest = split_model(model)               # float32 master weights
    tx = make_optimizer(ocfg, params)
    state = TrainState.create(params, tx, seed=0)
    step = jax.jit(make_train_step(graphdef, rest, tx, optim_config=ocfg, answer_ids=ids,
                                   plan_for_bucket={16: plan16, 32: plan32}, remat_policy="full"),
                   donate_argnums=0)
    state, metrics = step(state, step_inputs(batch))    # the pipeline's model keys

Written in the functional nnx.split / nnx.merge style and sharding-agnostic: the caller
(train/finetune.py) adds in/out shardings to `jax.jit`, and may pass `constrain(tree)`
(e.g. `jax.lax.with_sharding_constraint` to the parameters' shardings), applied to the
accumulated gradients and to the updated parameters.

- Mixed precision: TrainState.params are float32; inside the loss they are cast to
  `compute_dtype` and merged into the graph of the same model built with
  `dtype=compute_dtype` (so activations, visual embeddings and caches follow the
  compute dtype, as in bf16 inference); gradients come back float32 through the cast.
- Frozen parts (`OptimConfig.freeze`) enter the loss under `stop_gradient` (XLA drops
  their backward pass); the optimizer zeroes their updates and keeps no state for them.
- Gradient accumulation (`OptimConfig.accumulate` = n): the global batch (b rows) is
  split into n micro-batches of b / n rows (rows i * b/n ... in order) and a `lax.scan`
  adds their gradients; every micro-batch loss is divided by the whole batch's answer
  token count, so the sum equals the whole-batch loss and one optimizer update follows.
- Reduction: `plan_for_bucket` maps the batch's frame bucket (tubelets *
  temporal_patch) to a static ReductionPlan (or None: no reduction); one compile per
  bucket. Gradients flow through the kept tokens only; selection scores are under
  `stop_gradient` (`hybridvlm.lm.NemotronHForCausalLM._stage_order`).
- Remat: `remat_policy` names a `hybridvlm.remat.REMAT_POLICIES` entry, applied per LM layer
  and around the vision tower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from hybridvlm.remat import remat_policy as _check_remat
from train.loss import answer_loss, answer_weights, text_weights
from train.optim import FROZEN, OptimConfig, freeze_labels

# Batch keys the step reads (hybridvlm.data.layout.MODEL_KEYS); host-side keys are ignored.
STEP_KEYS = ("input_ids", "attention_mask", "pixel_values_videos", "labels", "loss_mask", "text_labels", "choice_ids",
             "valid")


def step_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's STEP_KEYS (drops the pipeline's host-side metadata, which `jax.jit`
    cannot take as arguments)."""
    return {k: batch[k] for k in STEP_KEYS if k in batch}


@struct.dataclass
class TrainState:
    """Everything a step changes (a pytree; donate it to the jitted step).

    params: nnx.State of the model's nnx.Param, float32 (frozen parts included; the
      optimizer leaves them unchanged). opt_state: the optax state.
    step: int32 scalar, optimizer updates done. rng: a PRNG key, split every step.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, *, seed: int = 0) -> "TrainState":
        """Step 0 of `params` (float32) with `optimizer`'s fresh state."""
        return cls(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                   rng=jax.random.key(seed))


def split_model(model: nnx.Module):
    """(graphdef, params, rest): the nnx.Param state cast to float32 master weights,
    and the rest of the model's state (no trainable values)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return graphdef, params, rest


def compute_model_def(model: nnx.Module, dtype):
    """(graphdef, abstract params) of `model`'s class and config built with `dtype`
    (no values computed: `nnx.eval_shape`). Parameter paths equal `model`'s."""
    build = lambda: type(model)(model.config, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params, _ = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    return graphdef, params


def compute_model_fn(graphdef, rest, compute_dtype) -> Callable[[Any], nnx.Module]:
    """params (float32 masters) -> the model computing in `compute_dtype`: each parameter cast
    to the dtype the compute-dtype model holds it in, merged into that model's graph (built
    once, at the first call; the masters' graph when the dtypes agree)."""
    cache = {}

    def to_model(params):
        if "def" not in cache:
            model = nnx.merge(graphdef, params, rest)  # at trace time: only its class and config are read
            cache["def"] = (graphdef, None) if jnp.dtype(compute_dtype) == model.dtype else \
                compute_model_def(model, compute_dtype)
        cgraph, cparams = cache["def"]
        if cparams is not None:
            params = jax.tree_util.tree_map(lambda x, like: x.astype(like.dtype), params, cparams)
        return nnx.merge(cgraph, params, rest)

    return to_model


def plan_lookup(plan_for_bucket) -> Callable[[int], Any]:
    if plan_for_bucket is None:
        return lambda frames: None
    if isinstance(plan_for_bucket, Mapping):
        def lookup(frames):
            if frames not in plan_for_bucket:
                raise KeyError(f"plan_for_bucket has no entry for the {frames}-frame bucket; it has "
                               f"{sorted(plan_for_bucket)}")
            return plan_for_bucket[frames]
        return lookup
    if callable(plan_for_bucket):
        return plan_for_bucket
    raise TypeError(f"plan_for_bucket must be None, a mapping or a callable, got {type(plan_for_bucket)}")


def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, *, optim_config: OptimConfig,
                    answer_ids, plan_for_bucket=None, compute_dtype=jnp.bfloat16, remat_policy: str | None = None,
                    constrain: Callable[[Any], Any] | None = None, max_answer_tokens: int = 1,
                    text_weight: float = 0.0, max_text_tokens: int = 0, sequence=None):
    """The train step function (not jitted: wrap it in `jax.jit(..., donate_argnums=0)`).

    Args:
      graphdef, rest: from `split_model(model)` of a NemotronHVLModel.
      optimizer: `train.optim.make_optimizer(optim_config, params)`.
      optim_config: its OptimConfig (accumulate, freeze and the schedule are read here).
      answer_ids: (num_letters,) token ids of the option letters, for the accuracy.
      plan_for_bucket: None (no reduction), a mapping frames -> ReductionPlan | None, or
        a callable frames -> ReductionPlan | None; frames = the batch's tubelets times
        the model's temporal patch (the pipeline's frame bucket).
      compute_dtype: dtype of the forward/backward (the parameters are cast to it).
      remat_policy: None or a `hybridvlm.remat.REMAT_POLICIES` name.
      constrain: optional tree -> tree hook (sharding constraints) applied to the
        accumulated gradients and to the updated parameters.
      max_answer_tokens: static answer tokens per row (`train.loss.answer_columns`).
      text_weight, max_text_tokens: an added loss on the text after the video
        (`train.loss.answer_loss`); 0 = none.
      sequence: None or a `hybridvlm.context.SequenceParallel` (the mesh's "sequence"
        axis): the LM's forward and backward run split along the sequence.
    Returns:
      step(state: TrainState, batch: dict) -> (TrainState, metrics), metrics a dict of
      float32 scalars: loss (mean cross-entropy over the batch's answer tokens),
      accuracy (multiple-choice, over the same tokens), answer_tokens, with a text loss
      text_loss (mean cross-entropy over the text tokens), grad_norm (global
      norm of the float32 gradients before clipping), learning_rate (of this update),
      tokens (real tokens of the batch, for throughput).
      batch: input_ids (b, L) int32, attention_mask (b, L) bool, pixel_values_videos
      (b, Bt, C, H, W) float32, labels (b, L) int32, loss_mask (b, L) bool, valid (b,)
      bool; b divisible by `optim_config.accumulate` (`step_inputs` picks these keys).
    """
    _check_remat(remat_policy)
    lookup = plan_lookup(plan_for_bucket)
    accumulate = optim_config.accumulate
    schedule = optim_config.schedule()
    answer_ids = tuple(int(i) for i in answer_ids)
    to_model = compute_model_fn(graphdef, rest, compute_dtype)

    def step(state: TrainState, batch):
        batch = {k: jnp.asarray(batch[k]) for k in STEP_KEYS if k in batch}
        model = nnx.merge(graphdef, state.params, rest)  # at trace time: the config
        frames = batch["pixel_values_videos"].shape[1] * model.config.temporal_patch_size
        plan = lookup(frames)
        labels = freeze_labels(state.params, optim_config.freeze)
        normalizer = jnp.sum(answer_weights(batch, max_answer_tokens)[1].astype(jnp.float32))
        text_normalizer = (jnp.sum(text_weights(batch, max_text_tokens)[1].astype(jnp.float32))
                           if text_weight > 0 else None)

        def loss_fn(params, micro):
            params = jax.tree_util.tree_map(lambda x, lab: jax.lax.stop_gradient(x) if lab == FROZEN else x,
                                            params, labels)
            return answer_loss(to_model(params), micro, answer_ids=answer_ids, reduction=plan, remat=remat_policy,
                               normalizer=normalizer, max_answer_tokens=max_answer_tokens, text_weight=text_weight,
                               max_text_tokens=max_text_tokens, text_normalizer=text_normalizer, sequence=sequence)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if accumulate == 1:
            (loss, aux), grads = grad_fn(state.params, batch)
        else:
            b = batch["input_ids"].shape[0]
            if b % accumulate:
                raise ValueError(f"a batch of {b} rows does not split into accumulate={accumulate} micro-batches")
            micro = jax.tree_util.tree_map(lambda x: x.reshape((accumulate, b // accumulate) + x.shape[1:]), batch)

            def body(carry, mb):
                g_acc, l_acc, a_acc = carry
                (l, a), g = grad_fn(state.params, mb)
                g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
                return (g_acc, l_acc + l, jax.tree_util.tree_map(jnp.add, a_acc, a)), None

            zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
            aux0 = dict(loss_sum=jnp.zeros((), jnp.float32), tokens=jnp.zeros((), jnp.float32),
                        correct=jnp.zeros((), jnp.float32))
            if text_weight > 0:
                aux0.update(text_loss_sum=jnp.zeros((), jnp.float32), text_tokens=jnp.zeros((), jnp.float32))
            (grads, loss, aux), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), aux0), micro)
        if constrain is not None:
            grads = constrain(grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if constrain is not None:
            params = constrain(params)
        rng, _ = jax.random.split(state.rng)
        metrics = dict(
            # The answer's cross-entropy (what eval_loss measures); a text term is reported apart.
            loss=aux["loss_sum"] / jnp.maximum(normalizer, 1.0),
            accuracy=aux["correct"] / jnp.maximum(aux["tokens"], 1.0),
            answer_tokens=aux["tokens"],
            grad_norm=grad_norm.astype(jnp.float32),
            learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
            tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32),
        )
        if text_weight > 0:
            metrics["text_loss"] = aux["text_loss_sum"] / jnp.maximum(aux["text_tokens"], 1.0)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng), metrics

    return step
