"""The pipelines' last stage, in the caller's thread: skip reports, stats, lockstep, devices.

`OutputIterDataset` takes the bucket batcher's elements (after grain's
prefetch), logs each skipped record (a warning naming the file and the reason,
once per record), counts everything in `PipelineStats` (part of the iterator
state, so a restored job keeps its counts), and yields batches, placed on a
mesh when one is given (`to_device`).

Multi-process jobs: every process builds its own share of each global batch
from its own shard, and all shares of a step must have the same shape. Before
each batch the processes exchange (bucket, has data) with `gather` (default:
`jax.experimental.multihost_utils.process_allgather` when there are several
processes) and all lay their rows out in the largest bucket any of them holds
(`layout.pad_to_bucket`; the logits of a row do not change); a process whose
data has ended contributes padding rows (`valid` False) until every process is
done, so an evaluation scores each example once. The exchange is a collective:
nothing after this stage may run it in another thread (do not wrap a
multi-process pipeline in a thread prefetch).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybridvlm.data.layout import MODEL_KEYS, pad_to_bucket, padding_batch
from hybridvlm.data.pipeline_config import PipelineConfig, PipelineError

log = logging.getLogger(__name__)

# gather(np.array([bucket, has_batch])) -> (processes, 2): every process's pair.
Gather = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class PipelineStats:
    """What a pipeline iterator has delivered and dropped so far (this process).

    batches, examples (valid rows), padding_rows: delivered.
    skipped: records dropped (every occurrence: a bad file is met again each epoch);
    skipped_by_kind: the same by reason kind ("unreadable", "too_long", "no_answer");
    skipped_records: uid -> "video: reason" of each distinct record dropped.
    """

    batches: int = 0
    examples: int = 0
    padding_rows: int = 0
    skipped: int = 0
    skipped_by_kind: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped_records: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PipelineStats":
        return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()})


def default_gather() -> Gather | None:
    """The cross-process exchange of a multi-process job, None with one process."""
    if jax.process_count() == 1:
        return None
    return lambda x: np.asarray(multihost_utils.process_allgather(x)).reshape(jax.process_count(), -1)


def batch_sharding(mesh: Mesh, axis: str | Sequence[str] = ("data", "fsdp")) -> NamedSharding:
    """Batch dimension over the mesh axes `axis` that `mesh` has (rows split over their
    product), every other dimension replicated."""
    wanted = (axis,) if isinstance(axis, str) else tuple(axis)
    present = tuple(a for a in wanted if a in mesh.axis_names)
    if not present:
        raise PipelineError(f"data_axis {wanted}: the mesh has none of these axes (it has {mesh.axis_names})")
    return NamedSharding(mesh, PartitionSpec(present[0] if len(present) == 1 else present))


def to_device(batch: Mapping[str, Any], mesh: Mesh, *,
              axis: str | Sequence[str] = ("data", "fsdp")) -> dict[str, Any]:
    """The model inputs of a process-local batch as global jax.Arrays sharded over `axis`
    (`jax.make_array_from_process_local_data`: each process passes its own rows); the
    host-side metadata stays numpy (this process's rows)."""
    sharding = batch_sharding(mesh, axis)
    out = dict(batch)
    for key in MODEL_KEYS:
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
    return out


class OutputIterDataset(grain.IterDataset):
    """Skip reports -> log + stats; lockstep across processes; device placement."""

    def __init__(self, parent: grain.IterDataset, *, cfg: PipelineConfig, rows: int, mesh: Mesh | None = None,
                 gather: Gather | None = None):
        super().__init__(parent)
        self._cfg = cfg
        self._rows = rows
        self._mesh = mesh
        self._gather = gather

    def __str__(self) -> str:
        return f"OutputIterDataset(rows={self._rows}, lockstep={self._gather is not None})"

    def __iter__(self) -> "OutputIterator":
        return OutputIterator(self._parent.__iter__(), cfg=self._cfg, rows=self._rows, mesh=self._mesh,
                              gather=self._gather)


class OutputIterator(grain.DatasetIterator):
    """Batches (dicts of arrays), with `.stats` (PipelineStats) of this iterator."""

    def __init__(self, parent: grain.DatasetIterator, *, cfg: PipelineConfig, rows: int, mesh: Mesh | None,
                 gather: Gather | None):
        super().__init__(parent)
        self._cfg = cfg
        self._rows = rows
        self._mesh = mesh
        self._gather = gather
        self._exhausted = False
        self.stats = PipelineStats()

    def _report(self, skipped) -> None:
        for uid, video, kind, reason in skipped:
            s = self.stats
            s.skipped += 1
            s.skipped_by_kind[kind] = s.skipped_by_kind.get(kind, 0) + 1
            if uid not in s.skipped_records:
                s.skipped_records[uid] = f"{video}: {reason}" if video else reason
                log.warning("skipped record %r (%s): %s", uid, video or kind, reason)

    def _local_batch(self):
        """The next batch of this process's data, or None when it has ended."""
        while not self._exhausted:
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self._report(element["skipped"])
            if element["batch"] is not None:
                return element["batch"]
        return None

    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        batch = self._local_batch()
        if self._gather is not None:
            bucket = 0 if batch is None else int(batch["bucket"][0])
            peers = np.asarray(self._gather(np.asarray([bucket, batch is not None], np.int32))).reshape(-1, 2)
            if not peers[:, 1].any():
                raise StopIteration
            bucket = int(peers[peers[:, 1] > 0, 0].max())
            batch = padding_batch(bucket, self._cfg, self._rows) if batch is None else pad_to_bucket(
                batch, bucket, self._cfg)
        elif batch is None:
            raise StopIteration
        valid = int(np.sum(batch["valid"]))
        self.stats.batches += 1
        self.stats.examples += valid
        self.stats.padding_rows += len(batch["valid"]) - valid
        return batch if self._mesh is None else to_device(batch, self._mesh, axis=self._cfg.data_axis)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "exhausted": self._exhausted, "stats": self.stats.to_dict()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._exhausted = bool(state["exhausted"])
        self.stats = PipelineStats.from_dict(state["stats"])
