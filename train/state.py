"""The sharded train state: its layout on the mesh, its creation, and the jitted step around it.

    mesh = train.mesh.make_mesh(cfg.mesh)
    model = init_sharded(lambda: NemotronHVLModel(vcfg, rngs=nnx.Rngs(0)), mesh)   # or a loaded model, sharded
    graphdef, params, rest = split_model(model)
    tx = make_optimizer(ocfg, params)
    layout = StateLayout.of(params, tx, mesh)            # NamedSharding of every TrainState leaf
    state = layout.create(params, tx, seed=0)            # jitted: optimizer state born on its shards
    step = layout.jit_step(make_train_step(graphdef, rest, tx, ..., constrain=layout.constrain))
    state, metrics = step(state, batch)                  # batch rows sharded over data x fsdp

Parameters follow the logical-axis rules of `hybridvlm.sharding` (the shardings their
arrays already carry when the model was built by `init_sharded` or placed by
`shard_model`); the optimizer's moments follow their parameters (`optax.tree_map_params`),
its counters and the step and PRNG key are replicated. `abstract()` gives the restore
target of a checkpoint on this mesh, whatever mesh wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybridvlm.sharding import LOGICAL_RULES, Rules, batch_sharding, param_shardings
from train.step import TrainState


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where every leaf of a TrainState lives on `mesh`.

    params: the parameters' shardings (an nnx.State of NamedSharding, same paths as the
      params). state: a TrainState of NamedSharding (prefix-compatible with the state).
    """

    mesh: Mesh
    params: Any
    state: TrainState

    @classmethod
    def of(cls, params: Any, optimizer: optax.GradientTransformation, mesh: Mesh,
           rules: Rules = LOGICAL_RULES) -> "StateLayout":
        """The layout for `params` (concrete or abstract nnx.State of Params carrying their
        logical names) and `optimizer`'s state, by the rule table."""
        param_sh = param_shardings(params, mesh, rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract_opt = jax.eval_shape(optimizer.init, params)
        # Moments mirror their parameter; counts, masks' placeholders and scalars replicate.
        opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, param_sh,
                                       transform_non_params=lambda _: replicated, is_leaf=_is_variable)
        state_sh = TrainState(params=param_sh, opt_state=opt_sh, step=replicated, rng=replicated)
        return cls(mesh=mesh, params=param_sh, state=state_sh)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch(self, batch_size: int | None = None) -> NamedSharding:
        """Rows over the data-parallel axes (a prefix sharding for every batch array)."""
        return batch_sharding(self.mesh, batch_size)

    def create(self, params: Any, optimizer: optax.GradientTransformation, *, seed: int) -> TrainState:
        """Step 0: `params` placed on their shards and the optimizer state created there
        (one jitted program, so no moment is ever whole on one device)."""
        params = jax.device_put(params, self.params)
        init = jax.jit(lambda p: TrainState.create(p, optimizer, seed=seed), out_shardings=self.state)
        return init(params)

    def abstract(self, params: Any, optimizer: optax.GradientTransformation, *, seed: int = 0) -> TrainState:
        """ShapeDtypeStructs with this layout's shardings: the restore target of a checkpoint."""
        shapes = jax.eval_shape(lambda p: TrainState.create(p, optimizer, seed=seed), params)
        # The shardings are a prefix of the state: a NamedSharding where the state holds an
        # nnx.Param node around its array, or an empty optax.MaskedNode (a frozen parameter's
        # moment), which gets none. Pair them by that prefix, not by flattened position.
        try:
            return jax.tree.map(
                lambda sh, sub: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), sub),
                self.state, shapes)
        except ValueError as e:
            raise ValueError(f"StateLayout: its shardings do not match the state (built for another model or "
                             f"optimizer?): {e}") from None

    def constrain(self, tree: Any) -> Any:
        """Pins a params-shaped tree (gradients, updated parameters) to the parameters' layout."""
        return jax.lax.with_sharding_constraint(tree, self.params)

    def jit_step(self, step_fn: Callable, *, donate: bool = True) -> Callable:
        """`jax.jit` of a `make_train_step` function with this layout's in/out shardings;
        the state is donated (updated in place). Metrics come back replicated."""
        return jax.jit(step_fn, in_shardings=(self.state, self.batch()), out_shardings=(self.state, self.replicated),
                       donate_argnums=(0,) if donate else ())

    def jit_eval(self, eval_fn: Callable) -> Callable:
        """`jax.jit` of eval_fn(params, batch) -> metrics with the parameters' and batch layout."""
        return jax.jit(eval_fn, in_shardings=(self.params, self.batch()), out_shardings=self.replicated)
