"""Multi-host start-up: when to call `jax.distributed.initialize()`, and process-0-only work.

    from train import distributed
    index, count = distributed.maybe_initialize(config.distributed)   # first, before any JAX call
    ...
    distributed.on_primary(write_config_json, workdir)                 # only process 0 writes it
    if distributed.is_primary():
        progress.update(...)

`maybe_initialize(enabled)`:
  - False: never initialises (a single-process job, whatever the environment says);
  - True: always calls `jax.distributed.initialize()`, which takes its arguments from the
    environment (JAX's cluster detection) or fails naming what is missing;
  - None: initialises when the environment describes a multi-process job:
    `JAX_COORDINATOR_ADDRESS` is set, or one of the cluster environments that JAX itself
    auto-detects in `jax.distributed.initialize()` (Cloud TPU VMs (GCE, GKE), SLURM, Open
    MPI's mpirun, Kubernetes) is present and reports more than one process. The detection
    is JAX's (its `ClusterEnv` classes); this module only decides whether to call it.
It never initialises twice (a second call returns the running job's numbers).

JAX reads the coordinator from `JAX_COORDINATOR_ADDRESS` but has no variable for the
process count and id; for a job launched by hand (one process per GPU, say) set
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` too, which are passed on when present. A
cluster JAX detects (SLURM, mpirun, TPU pods) needs none of them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.experimental import multihost_utils

T = TypeVar("T")

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize itself
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"  # read here (JAX has no variable for these two)
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def detected_cluster():
    """The JAX `ClusterEnv` class that `jax.distributed.initialize()` would use here, or None.

    JAX's own detection, in JAX's order, without its opt-in-only methods (mpi4py), as
    `initialize` does when no `cluster_detection_method` is given.
    """
    # Private module: JAX exposes the detection only through initialize() itself.
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        with warnings.catch_warnings():
            # The Kubernetes probe warns when its client package is missing: here that only
            # means "not a cluster JAX can bootstrap from", which is the answer we want.
            warnings.simplefilter("ignore")
            try:
                present = env.is_env_present()
            except Exception:  # noqa: BLE001 -- a probe that cannot run means "not this cluster"
                present = False
        if present:
            return env
    return None


def multi_process_requested(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment describes a job of more than one process (see the module docstring)."""
    environ = os.environ if environ is None else environ
    if environ.get(COORDINATOR_ENV):
        return True
    env = detected_cluster()
    if env is None:
        return False
    try:
        return env.get_process_count() > 1
    except Exception:  # noqa: BLE001 -- the cluster is there but cannot say: let initialize() decide (and report)
        return True


def _initialize_kwargs(environ: dict[str, str]) -> dict[str, int]:
    kwargs = {}
    for name, key in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
        if environ.get(name):
            try:
                kwargs[key] = int(environ[name])
            except ValueError:
                raise ValueError(f"{name}={environ[name]!r} is not an integer") from None
    return kwargs


def maybe_initialize(enabled: bool | None = None) -> tuple[int, int]:
    """Starts JAX's multi-process runtime when asked or when the job is multi-process.

    Must run before anything touches a JAX backend (`jax.devices()`, any computation):
    JAX refuses to initialise afterwards.

    Args:
      enabled: True (always), False (never) or None (when `multi_process_requested()`).
    Returns:
      (process_index, process_count) of this process in the job; (0, 1) when it runs
      alone, found without initialising a backend.
    Raises:
      RuntimeError (from JAX) when initialisation is due but a backend already runs, or the
      coordinator cannot be reached; ValueError when the environment lacks what JAX needs.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if enabled is None:
        enabled = multi_process_requested()
    if not enabled:
        # Alone, without touching the backend: the caller may still configure it (e.g. the
        # number of fake CPU devices), which JAX allows only before its initialisation.
        return 0, 1
    jax.distributed.initialize(**_initialize_kwargs(os.environ))
    return jax.process_index(), jax.process_count()


def is_primary() -> bool:
    """True on process 0 (the one that logs, shows progress and writes single files)."""
    return jax.process_index() == 0


def on_primary(fn: Callable[..., T], *args: Any, barrier: str | None = None, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)` on process 0 only; its result there, None on the others.

    barrier: a name; then every process waits, after process 0 has run `fn`, until all
    reach this point (`multihost_utils.sync_global_devices`), e.g. so the others can read
    a file process 0 has just written. With a barrier, every process must make the call,
    with the same name, in the same order. Single-process jobs skip the barrier.
    """
    result = fn(*args, **kwargs) if is_primary() else None
    if barrier is not None and jax.process_count() > 1:
        multihost_utils.sync_global_devices(barrier)
    return result
