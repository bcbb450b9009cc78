"""Logical-axis sharding: one rule table from logical names to mesh axes.

Every parameter carries one logical name (or None) per dimension, as Flax's
`out_sharding` metadata (`hybridvlm.layers.init.param`); activations are
named at the call site (`logical_constraint`). `LOGICAL_RULES` maps each name
to a mesh axis of the device mesh (`train.mesh`: "data", "fsdp", "sequence", "tensor"), a tuple of them
(the dimension splits over their product), or None (replicated).

Policy: a weight's model-parallel dimension (attention heads, MLP hidden
units, Mamba heads, inner channels and B/C groups, vocabulary, ViT heads and MLP, the
projector's hidden units) goes on "tensor", its model-width dimension
("embed", "vit_embed", "vit_merged") on "fsdp"; small vectors follow their
dimension's name; kernel taps, head_dim and patch pixels stay replicated.

Resolution (`mesh_spec`) is per array, in dimension order, and never fails
on sizes: a mesh axis is skipped for a dimension it does not divide (tiny
configs, odd vocabularies, more tensor shards than KV heads), and a mesh
axis already taken by an earlier dimension is not reused (the residual
stream ("batch", "seq", "embed") keeps fsdp on the batch, so activations are
FSDP-style batch-sharded while the weights' "embed" dimension is on fsdp).
A skipped axis means replication along it, i.e. more memory, never a wrong
result. Only an unknown logical name is an error.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

LOGICAL_RULES: dict[str, MeshAxes] = {
    # Activations (`logical_constraint`): batches over every data-parallel axis.
    "batch": ("data", "fsdp"),
    "seq": None,
    # Language model (hybridvlm/lm.py, hybridvlm/layers/*.py).
    "vocab": "tensor",  # embedding (vocab, embed), lm_head (embed, vocab)
    "embed": "fsdp",  # model width: every LM weight's other large axis; norms, biases
    "q_heads": "tensor",  # attention q (embed, q_heads, head_dim), o (q_heads, head_dim, embed)
    "kv_heads": "tensor",  # attention k, v (embed, kv_heads, head_dim)
    "head_dim": None,
    "mlp": "tensor",  # MLP up (embed, mlp), down (mlp, embed), up bias
    # Mamba-2. HF's fused in_proj ([z | x | B | C | dt]) and conv ([x | B | C])
    # are stored one parameter per part (hybridvlm/layers/mamba2.py), so each
    # part splits along its own model-parallel dimension and no shard mixes parts.
    "mamba_inner": "tensor",  # z_proj, x_proj (embed, mamba_inner), conv_x, out_proj, gated-norm weight
    "mamba_groups": "tensor",  # B_proj, C_proj (embed, mamba_groups, mamba_state), conv_B, conv_C
    "mamba_state": None,  # the SSM state size within a group
    "mamba_heads": "tensor",  # dt_proj (embed, mamba_heads), A_log, D, dt_bias (heads,)
    "conv_kernel": None,  # 4 taps
    # Vision tower (hybridvlm/radio.py): q/k/v/o are (d, heads * head_dim), so
    # "tensor" splits whole heads when it divides num_heads.
    "vit_patch": None,  # patch pixels of the patch projections: small, replicated
    "vit_embed": "fsdp",
    "vit_heads": "tensor",
    "vit_mlp": "tensor",
    # Projector (hybridvlm/vlm.py): linear_1 (vit_merged, proj_hidden), linear_2 (proj_hidden, embed).
    "vit_merged": "fsdp",
    "proj_hidden": "tensor",
}


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def logical_names(leaf) -> tuple[str | None, ...] | None:
    """The logical axis names of one nnx.Variable (its `out_sharding` metadata),
    or None when it has none (replicated)."""
    if not _is_variable(leaf):
        return None
    names = leaf.get_metadata().get("out_sharding")
    return tuple(names) if names else None


def mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
              rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dimensions are named `names`.

    mesh_shape: {axis name: size} (`mesh.shape`). Mesh axes of a rule that the
    mesh lacks, that are already used by an earlier dimension, or whose size
    does not divide what is left of the dimension are skipped (see the module
    docstring). Raises KeyError for a name missing from `rules`.
    """
    names, shape = tuple(names), tuple(shape)
    if len(names) != len(shape):
        raise ValueError(f"logical axes {names} do not match shape {shape}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, dim in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule in the sharding table (hybridvlm/sharding.py)")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept, split = [], 1
        for axis in axes:
            if axis in used or axis not in mesh_shape or dim % (split * mesh_shape[axis]):
                continue
            kept.append(axis)
            split *= mesh_shape[axis]
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:  # P('a', None) == P('a'): keep specs canonical for comparisons
        out.pop()
    return PartitionSpec(*out)


def logical_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """NamedSharding of an array (shape) with logical dimension names, e.g. the
    logits' ("batch", "seq", "vocab") as a jit out_sharding."""
    return NamedSharding(mesh, mesh_spec(names, shape, dict(mesh.shape), rules))


def logical_specs(tree) -> Any:
    """Tree of logical PartitionSpecs, e.g. P('vocab', 'embed'), one per
    nnx.Variable (P() for Variables without names and for plain arrays).

    tree: a model's nnx.State (concrete or from nnx.eval_shape), an optimizer's
    state, or any pytree of Variables; the result has the same structure with a
    PartitionSpec in place of each Variable.
    """
    return jax.tree.map(lambda v: PartitionSpec(*(logical_names(v) or ())), tree, is_leaf=_is_variable)


def _state(model_or_state):
    return nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state


def param_shardings(model_or_state, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """Tree of NamedSharding, one per Variable (or array) of a model or state.

    The tree mirrors `nnx.state(model)` (or the state passed), so it serves
    as jit in/out shardings and as `jax.device_put`'s target for that state.
    Raises KeyError naming the parameter whose logical name has no rule.
    """
    mesh_shape = dict(mesh.shape)

    def one(path, leaf):
        names = logical_names(leaf)
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        try:
            return NamedSharding(mesh, mesh_spec(names, leaf.shape, mesh_shape, rules))
        except KeyError as e:
            raise KeyError(f"{_path_str(path)}: {e.args[0]}") from None

    return jax.tree_util.tree_map_with_path(one, _state(model_or_state), is_leaf=_is_variable)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Moves an existing model's state onto its shards (in place); returns the model.

    The arrays pass through the host/default device first: for models that fit
    one device (tests, small checkpoints). Big models: `init_sharded`.
    """
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def init_sharded(build_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = LOGICAL_RULES) -> nnx.Module:
    """Builds `build_fn()`'s model directly in the sharded layout.

    The structure comes from `nnx.eval_shape` (no memory); the initialisers
    then run inside one jit whose out_shardings are the rule table's, so XLA
    computes each device's shard where it lives and no device ever holds the
    whole model. The values are `build_fn()`'s (same RNG streams; measured
    within 6e-8 of an eager build: XLA fuses the jitted initialisers).
    """
    graphdef, abstract_state = nnx.split(nnx.eval_shape(build_fn))
    shardings = param_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(build_fn())[1]

    return nnx.merge(graphdef, init())


def batch_sharding(mesh: Mesh, batch_size: int | None = None, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Sharding of (batch, ...) arrays: rows over every data-parallel axis
    ("data" and "fsdp"), other dimensions replicated.

    batch_size: when given, axes that do not divide it are dropped (the
    `mesh_spec` fallback); without it the caller guarantees divisibility.
    """
    if batch_size is None:
        return NamedSharding(mesh, PartitionSpec(rules["batch"]))
    return logical_sharding(("batch",), (batch_size,), mesh, rules)


def logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None = None,
                       rules: Rules = LOGICAL_RULES) -> jax.Array:
    """`with_sharding_constraint` by logical names, for activations at block boundaries.

    x: (d0, ..., dn) with len(names) == x.ndim, e.g. the residual stream
    (b, t, d) with ("batch", "seq", "embed"). mesh: None = the ambient mesh
    (`jax.set_mesh`); with no mesh at all this returns x unchanged, so the
    model can call it unconditionally and unsharded runs are unaffected.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
    spec = mesh_spec(names, x.shape, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
