"""The run's metrics log: `WORKDIR/metrics.jsonl` plus TensorBoard event files.

One JSON object per line: training rows {"step", "loss", "learning_rate", "grad_norm",
"tokens_per_s", ...} and evaluation rows {"step", "split": "eval", "eval_loss",
"eval_accuracy", ...}. Each line is flushed when written, so a killed run loses no
finished row. A resumed run first drops the rows of steps after the checkpoint it
restored (they are recomputed, identically, and logged again): the log then reads as one
uninterrupted run. TensorBoard files (tensorboardX, no TensorFlow) go to
`WORKDIR/tensorboard/`; on resume the writer purges the same steps.

Only the primary process writes (`enabled=False` elsewhere).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter

from hybridvlm import atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl (a final line cut short by a crash is ignored)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partial last line: the process died while writing it
    return rows


def _clean(value: Any) -> Any:
    # JSON has no NaN/inf: write them as strings a reader can still recognise.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends rows to workdir/metrics.jsonl and TensorBoard scalars.

    resume_step: the step the run continues after (rows with a larger step are
      dropped first); None for a fresh run (an existing file is replaced).
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None, tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._file = None
        self._tb = None
        if not enabled:
            return
        keep = []
        if resume_step is not None and os.path.exists(self.path):
            keep = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
        atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), TENSORBOARD_DIR),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, values: Mapping[str, Any], *, prefix: str = "train") -> dict:
        """Logs one row {"step": step, **values}; returns it."""
        row = {"step": int(step), **{k: _clean(float(v) if hasattr(v, "__float__") else v)
                                      for k, v in values.items()}}
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, global_step=int(step))
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
