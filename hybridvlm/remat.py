"""Rematerialisation (gradient checkpointing) per layer or block, by policy name.

    policy = remat_policy("full")             # None for "none" / None
    y = remat_call(block, policy, x, ...)     # block(x, ...) under jax.checkpoint

The LM applies it per layer, the vision tower per block: the backward pass then
recomputes one block's intermediates at a time from that block's saved input.
"""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["REMAT_POLICIES", "remat_call", "remat_policy"]

# Rematerialisation policies by name (`run_layers(remat=...)`): "none" keeps every
# activation; "full" and "nothing_saveable" save only each block's inputs and
# recompute the rest in the backward pass; "dots_saveable" also keeps matmul outputs.
REMAT_POLICIES = ("none", "full", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat_policy(name: str | None):
    """A `REMAT_POLICIES` name -> None (no remat) or a `jax.checkpoint` policy."""
    if name is None or name == "none":
        return None
    if name in ("full", "nothing_saveable"):
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    if name == "dots_with_no_batch_dims_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"unknown remat policy {name!r}; use one of {REMAT_POLICIES}")


def remat_call(module: nnx.Module, policy, *args):
    """`module(*args)[0]` (or the whole output when not a tuple) under
    `jax.checkpoint(policy=policy)`, in the functional nnx.split / merge style,
    so the backward pass recomputes the module's intermediates from its inputs
    and its state. The module's state is read, never written."""
    graphdef, state = nnx.split(module)

    def run(state, *args):
        out = nnx.merge(graphdef, state)(*args)
        return out[0] if isinstance(out, tuple) else out

    return jax.checkpoint(run, policy=policy)(state, *args)
