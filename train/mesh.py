"""The device mesh of sharded finetuning: named axes ("data", "fsdp", "sequence", "tensor").

- data:     pure data parallelism (parameters replicated across it);
- fsdp:     data parallelism whose replicas also split the parameters and
            optimizer state (gathered per layer when used);
- sequence: context parallelism: each row's prompt split into contiguous blocks
            for the LM's layers (`hybridvlm.context`; parameters replicated across it);
- tensor:   model parallelism (attention heads, MLP hidden units, Mamba heads,
            vocabulary).
Batches shard over data x fsdp (`hybridvlm.sharding.batch_sharding`); the rule
table in `hybridvlm.sharding` maps parameters onto fsdp and tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from hybridvlm.context.prefill import SequenceParallel, shard_plan

AXES = ("data", "fsdp", "sequence", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one of them may be -1 (= the devices the others leave)."""

    data: int = 1
    fsdp: int = -1
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def from_config(cls, cfg: Any) -> "MeshConfig":
        """From anything with `data`, `fsdp`, `tensor` (and optionally `sequence`, default 1:
        configs written before the axis existed) attributes: an ml_collections ConfigDict
        such as `config.mesh`, or a MeshConfig."""
        return cls(**{axis: getattr(cfg, axis, 1) if axis == "sequence" else getattr(cfg, axis) for axis in AXES})

    def sizes(self, num_devices: int) -> tuple[int, int, int, int]:
        """(data, fsdp, sequence, tensor) for `num_devices` devices, -1 resolved.

        Raises ValueError naming the offending field and the device count.
        """
        given = {axis: getattr(self, axis) for axis in AXES}
        for axis, size in given.items():
            if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"mesh.{axis}={size!r}: must be a positive integer or -1 "
                                 f"(the rest of the {num_devices} devices)")
        free = [axis for axis, size in given.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh.{' and mesh.'.join(free)} are all -1: at most one axis may take "
                             f"the rest of the {num_devices} devices")
        fixed = math.prod(size for size in given.values() if size != -1)
        if free:
            if num_devices % fixed:
                others = ", ".join(f"mesh.{a}={s}" for a, s in given.items() if s != -1)
                raise ValueError(f"mesh.{free[0]}=-1: {num_devices} devices are not a multiple of "
                                 f"{others} (product {fixed})")
            given[free[0]] = num_devices // fixed
        elif fixed != num_devices:
            detail = " x ".join(f"mesh.{a}={s}" for a, s in given.items())
            raise ValueError(f"{detail} = {fixed} devices, but there are {num_devices} "
                             "(set one axis to -1 to take the rest)")
        return tuple(int(given[axis]) for axis in AXES)


def make_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "sequence", "tensor") mesh over `devices` (default: all of them).

    cfg: a MeshConfig, or anything `MeshConfig.from_config` reads; None = all
    devices on fsdp. Axis types are Auto, not the Explicit default of this JAX:
    the model is written without sharding-in-types, and the layout comes from
    NamedSharding in/out shardings plus `with_sharding_constraint` at block
    boundaries, which GSPMD propagates; Explicit axes would instead require
    every op with ambiguous output sharding to be annotated.
    """
    cfg = MeshConfig() if cfg is None else (cfg if isinstance(cfg, MeshConfig) else MeshConfig.from_config(cfg))
    devices = list(jax.devices() if devices is None else devices)
    shape = cfg.sizes(len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def sequence_split(mesh: Mesh, plans: dict[int, Any]) -> tuple[SequenceParallel | None, dict[int, Any]]:
    """Context parallelism of `mesh`: (SequenceParallel over its "sequence" axis, or None
    where that axis has size 1, and `plans` {bucket: ReductionPlan | None} with each stage's
    dropped count rounded to a multiple of the axis size (`shard_plan`; unchanged at 1))."""
    shards = int(mesh.shape.get("sequence", 1))
    if shards == 1:
        return None, plans
    return SequenceParallel(mesh, "sequence"), {b: shard_plan(p, shards) for b, p in plans.items()}
