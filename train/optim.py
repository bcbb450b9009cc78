"""The finetuning optimizer: AdamW, warmup + cosine decay, global-norm clipping, freezing.

    cfg = OptimConfig(learning_rate=2e-4, warmup_steps=100, total_steps=10_000, freeze=("vision",))
    tx = make_optimizer(cfg, params)          # params: nnx.State of the model's nnx.Param
    opt_state = tx.init(params)
    cfg.learning_rate_at(step)                # for logging

- Weight decay skips norms (any parameter under a module whose name contains "norm"),
  biases ("bias", "b", "*_bias": conv_bias, dt_bias) and the Mamba-2 `A_log`, `D` and
  `dt_bias` (`decay_mask`).
- Frozen parts (`freeze`) go through `optax.set_to_zero` inside `optax.multi_transform`:
  they never move and carry no optimizer state (`optax.MaskedNode` in its place);
  `train.step` also stops their gradients so XLA skips their backward pass.
- Clipping (`clip_norm`) is global over the trainable gradients, before AdamW.
- Gradient accumulation (`accumulate` micro-batches) happens inside the train step
  (`train.step.make_train_step`: a `lax.scan` over micro-batches, one optimizer update
  per step), not with `optax.MultiSteps`: the step counter, the schedule and the
  logged metrics then count optimizer updates, and no accumulator the size of the
  parameters lives in the optimizer state.
Master weights and optimizer moments are float32 (the parameters' dtype; `make_optimizer`
refuses others).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

# Parts of a NemotronHVLModel that `freeze` names, as top-level attribute paths.
PARTS = ("vision", "projector", "lm", "lm_embed")
_NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "bias", "b")
TRAIN, FROZEN = "train", "frozen"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer hyper-parameters.

    learning_rate: peak learning rate, reached after `warmup_steps` (linear from 0).
    total_steps: optimizer steps of the whole schedule (warmup included); cosine decay
      from the peak to `learning_rate * end_lr_factor` at `total_steps`, constant after.
    weight_decay: decoupled AdamW decay (on matrices/embeddings, see `decay_mask`).
    b1, b2, eps: Adam moments. clip_norm: global-norm clipping (<= 0: none).
    accumulate: micro-batches per step (the global batch must split evenly).
    freeze: parts among PARTS: "vision" (tower + its final norm), "projector", "lm" (the
      whole language model), "lm_embed" (its embedding table and untied head).
    """

    learning_rate: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 10_000
    end_lr_factor: float = 0.1
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    accumulate: int = 1
    freeze: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "freeze", tuple(self.freeze))
        bad = [p for p in self.freeze if p not in PARTS]
        if bad:
            raise ValueError(f"OptimConfig.freeze: unknown part(s) {bad}; choose among {PARTS}")
        if self.learning_rate < 0:
            raise ValueError(f"OptimConfig.learning_rate must be >= 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps <= self.warmup_steps:
            raise ValueError(f"OptimConfig.total_steps ({self.total_steps}) must exceed warmup_steps "
                             f"({self.warmup_steps})")
        if not 0.0 <= self.end_lr_factor <= 1.0:
            raise ValueError(f"OptimConfig.end_lr_factor must be in [0, 1], got {self.end_lr_factor}")
        if self.accumulate < 1:
            raise ValueError(f"OptimConfig.accumulate must be >= 1, got {self.accumulate}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay must be >= 0, got {self.weight_decay}")

    def schedule(self) -> optax.Schedule:
        """step -> learning rate (linear warmup, then cosine decay)."""
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.learning_rate, warmup_steps=self.warmup_steps,
            decay_steps=self.total_steps, end_value=self.learning_rate * self.end_lr_factor)

    def learning_rate_at(self, step) -> jax.Array:
        """The learning rate of optimizer update number `step` (0-based), float32."""
        return jnp.asarray(self.schedule()(step), jnp.float32)


def path_names(path) -> tuple[str, ...]:
    """A pytree key path of an nnx.State leaf -> its names ('language_model', 'layers',
    '0', 'mixer', 'A_log'), without the Variable's trailing 'value'."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(str(k.name))
        else:
            names.append(str(k))
    if names and names[-1] == "value":
        names.pop()
    return tuple(names)


def decays(names: tuple[str, ...]) -> bool:
    """Whether a parameter at these path names gets weight decay."""
    leaf = names[-1]
    if leaf in _NO_DECAY_NAMES or leaf.endswith("_bias"):
        return False
    return not any("norm" in n for n in names[:-1])


def part_of(names: tuple[str, ...]) -> set[str]:
    """The PARTS a parameter belongs to (a plain language model's are all "lm")."""
    top = names[0]
    if top in ("vision", "vision_norm"):
        return {"vision"}
    if top == "projector":
        return {"projector"}
    lm = names[1:] if top == "language_model" else names
    return {"lm", "lm_embed"} if lm and lm[0] in ("embed", "lm_head") else {"lm"}


def decay_mask(params):
    """Pytree like `params` of bool: True where AdamW applies weight decay."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(path_names(p)), params)


def freeze_labels(params, freeze: tuple[str, ...]):
    """Pytree like `params` of "train" / "frozen" (the `optax.multi_transform` labels)."""
    bad = [p for p in freeze if p not in PARTS]
    if bad:
        raise ValueError(f"freeze: unknown part(s) {bad}; choose among {PARTS}")
    frozen = set(freeze)
    return jax.tree_util.tree_map_with_path(lambda p, _: FROZEN if part_of(path_names(p)) & frozen else TRAIN,
                                            params)


def make_optimizer(cfg: OptimConfig, params) -> optax.GradientTransformation:
    """AdamW (schedule, decay mask) after global-norm clipping, with frozen parts zeroed.

    Args:
      cfg: OptimConfig.
      params: nnx.State (any pytree) of the float32 parameters the step updates; it
        fixes the structure of the labels (values are not read).
    Returns:
      an optax GradientTransformation for gradients shaped like `params`.
    """
    leaves = jax.tree_util.tree_leaves(params)
    wrong = {str(x.dtype) for x in leaves if x.dtype != jnp.float32}
    if wrong:
        raise ValueError(f"make_optimizer: master weights must be float32, got {sorted(wrong)}")
    labels = freeze_labels(params, cfg.freeze)
    if TRAIN not in jax.tree_util.tree_leaves(labels):
        raise ValueError(f"freeze={cfg.freeze} freezes every parameter: nothing would train")
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(cfg.schedule(), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    train = optax.chain(*chain)
    if FROZEN not in jax.tree_util.tree_leaves(labels):
        return train
    return optax.multi_transform({TRAIN: train, FROZEN: optax.set_to_zero()}, labels)
