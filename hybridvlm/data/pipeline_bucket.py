"""Group examples by frame bucket into static-shape batches: a grain IterDataset.

`BucketBatchIterDataset` reads a `MapDataset` of prepared examples in order
(decoding a few ahead in threads), keeps one buffer per frame bucket and emits
a bucket's batch when its buffer holds a batch; a batch never mixes buckets,
so each bucket is one compiled program. With `flush` (evaluation) the buffers
left when the data ends are emitted as partial batches, padded with padding
rows, smallest bucket first.

Like grain's `PrefetchIterDataset`, its parent is the `MapDataset` itself:
its state is positions in it (the next one to read, the positions held in each
buffer, skip reports not yet emitted), all JSON, and restoring re-reads the
buffered positions, so a restored iterator emits exactly the batches the
uninterrupted one would. `mp_prefetch` gives each worker the slice
`worker::num_workers` of the parent (`set_slice`).

Each element is `{"batch": dict | None, "skipped": [[uid, video, kind, reason], ...]}`:
the records skipped since the previous element travel with the next batch (or
alone at the end) to the output stage in the main process, which logs and counts
them (`hybridvlm.data.pipeline_output`).
"""

from __future__ import annotations

import collections
from concurrent import futures
from typing import Any

import grain

from hybridvlm.data.layout import collate
from hybridvlm.data.pipeline_config import PipelineConfig, PipelineError
from hybridvlm.data.pipeline_example import Skipped


class BucketBatchIterDataset(grain.IterDataset):
    """Batches of `rows` examples of one frame bucket each.

    Args:
      parent: MapDataset of `Example | Skipped` (see `PrepareExample`).
      cfg: the pipeline config (buckets, row lengths).
      rows: rows per batch (this process's share of the global batch).
      flush: emit the partial buffers at the end (evaluation); otherwise they are
        dropped (an infinite training stream never ends).
      read_threads: threads preparing examples ahead (0: in the calling thread);
        read_ahead: examples prepared ahead.
      max_consecutive_skips: raise PipelineError after this many skipped examples in a
        row (a training stream whose every record is unreadable would spin forever).
    """

    def __init__(self, parent: grain.MapDataset, *, cfg: PipelineConfig, rows: int, flush: bool,
                 read_threads: int = 0, read_ahead: int = 0, max_consecutive_skips: int | None = None):
        super().__init__(parent)
        self._cfg = cfg
        self._rows = rows
        self._flush = flush
        self._read_threads = read_threads
        self._read_ahead = read_ahead
        self._max_skips = max_consecutive_skips

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """grain's worker slicing (mp_prefetch): this worker reads `parent[sl]`."""
        del sequential_slice  # one strided slice serves both: order within a worker is kept
        self._parents = (self._parent.slice(sl),)

    def __str__(self) -> str:
        return f"BucketBatchIterDataset(rows={self._rows}, buckets={self._cfg.buckets}, flush={self._flush})"

    def __iter__(self) -> "BucketBatchIterator":
        return BucketBatchIterator(self._parent, cfg=self._cfg, rows=self._rows, flush=self._flush,
                                   read_threads=self._read_threads, read_ahead=self._read_ahead,
                                   max_consecutive_skips=self._max_skips)


class BucketBatchIterator(grain.DatasetIterator):
    """The iterator of `BucketBatchIterDataset` (its state: see the module docstring)."""

    def __init__(self, parent: grain.MapDataset, *, cfg: PipelineConfig, rows: int, flush: bool, read_threads: int,
                 read_ahead: int, max_consecutive_skips: int | None):
        super().__init__()
        self._map = parent
        self._length = len(parent)
        self._cfg = cfg
        self._rows = rows
        self._flush = flush
        self._max_skips = max_consecutive_skips
        self._read_ahead = max(read_ahead, read_threads) if read_threads > 0 else 0
        self._executor = futures.ThreadPoolExecutor(read_threads, "bucket-read") if self._read_ahead else None
        self._ahead: collections.deque[futures.Future] = collections.deque()  # positions _next, _next + 1, ...
        self._next = 0  # the next position to take into a buffer
        self._buffers: dict[int, list[tuple[int, Any]]] = {}
        self._pending: list[list[str]] = []
        self._consecutive = 0

    # ------------------------------------------------------------------ reading
    def _take(self):
        """The element at position self._next (prepared ahead in threads when enabled)."""
        if self._executor is None:
            return self._map[self._next]
        submitted = self._next + len(self._ahead)
        while len(self._ahead) < self._read_ahead and submitted < self._length:
            self._ahead.append(self._executor.submit(self._map.__getitem__, submitted))
            submitted += 1
        return self._ahead.popleft().result()

    def _cancel_ahead(self) -> None:
        while self._ahead:
            self._ahead.popleft().cancel()

    # ------------------------------------------------------------------ iteration
    def __next__(self) -> dict[str, Any]:
        self._assert_not_closed()
        while True:
            if self._next >= self._length:
                if self._flush:
                    for bucket in sorted(self._buffers):
                        return self._emit(bucket)
                if self._pending:
                    return self._emit(None)
                raise StopIteration
            element = self._take()
            position = self._next
            self._next += 1
            if isinstance(element, Skipped):
                self._pending.append(element.as_list())
                self._consecutive += 1
                if self._max_skips and self._consecutive >= self._max_skips:
                    raise PipelineError(f"{self._consecutive} examples in a row were skipped (the whole shard): "
                                        f"nothing to train on; the last: {element.uid!r}: {element.reason}")
                continue
            self._consecutive = 0
            buffer = self._buffers.setdefault(element.bucket, [])
            buffer.append((position, element))
            if len(buffer) == self._rows:
                return self._emit(element.bucket)

    def _emit(self, bucket: int | None) -> dict[str, Any]:
        batch = None
        if bucket is not None:
            batch = collate([e for _, e in self._buffers.pop(bucket)], bucket, self._cfg, self._rows)
        out = {"batch": batch, "skipped": self._pending}
        self._pending = []
        return out

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict[str, Any]:
        return {
            "next": self._next,
            "buffers": {str(b): [p for p, _ in entries] for b, entries in sorted(self._buffers.items())},
            "pending": [list(s) for s in self._pending],
            "consecutive": self._consecutive,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._cancel_ahead()
        self._next = int(state["next"])
        self._pending = [list(s) for s in state["pending"]]
        self._consecutive = int(state["consecutive"])
        positions = {int(b): [int(p) for p in ps] for b, ps in state["buffers"].items()}
        flat = [p for ps in positions.values() for p in ps]
        read = list(self._executor.map(self._map.__getitem__, flat)) if self._executor else [self._map[p] for p in flat]
        elements = dict(zip(flat, read))
        self._buffers = {b: [(p, elements[p]) for p in ps] for b, ps in positions.items() if ps}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._cancel_ahead()
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __str__(self) -> str:
        return f"BucketBatchIterator(rows={self._rows}, next={self._next})"
