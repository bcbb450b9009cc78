"""Checkpoints of a finetuning run: train state, data iterator and run config in one Orbax step.

Layout under `directory` (one folder per saved step, written by `ocp.CheckpointManager`):

    <step>/state/       the train-state pytree (params, opt_state, step, rng), StandardSave
    <step>/data_iter/   the grain iterator, `process_<i>-of-<n>.json` per process (optional)
    <step>/config/      the run config as JSON (optional)
    <step>.orbax-checkpoint-tmp/   a save in progress (or one a crash interrupted)

Usage in a training loop:

    ckpt = TrainCheckpointer(workdir / "checkpoints", save_every=cfg.checkpoint_every, keep=3)
    with preemption_guard() as guard:
        if ckpt.latest_step() is not None:
            state, _ = ckpt.restore(abstract_state=abstract_state, data_iter=it)
        for step in range(int(state["step"]) + 1, cfg.steps + 1):
            batch = next(it)
            state, metrics = train_step(state, batch)       # state["step"] == step afterwards
            stop = guard.should_stop(step)
            ckpt.maybe_save(step, state, data_iter=it, config=cfg.to_dict(), force=stop or step == cfg.steps)
            if stop:
                break
    ckpt.close()                                             # waits for the last save

Crash safety. Orbax writes every step into `<step>.orbax-checkpoint-tmp` and renames it to
`<step>` only after all items (arrays, iterator files, config, metadata) are written, so a
process killed at any moment (kill -9 included) leaves either a complete `<step>` or a
temporary folder that `latest_step` never returns. A later save of the same step replaces a
stale temporary folder, and `cleanup_tmp_directories` removes the others when the
checkpointer is created.

Asynchronous saves. `maybe_save` returns once the arrays are copied off the devices and the
iterator and config are captured; the file writes finish in a background thread. The caller
may therefore donate or overwrite the state and advance the iterator right after the call.
The next save, `restore`, `wait` and `close` wait for a pending save first.

Multi-host. Every process calls `maybe_save`/`restore` with the same step (Orbax writes the
arrays collectively: each process writes the shards it owns and process 0 commits), on a file
system all processes share. The state must hold only arrays (global `jax.Array`s); the one
per-process object is the data iterator, which each process saves to its own JSON file. The
config is written by the primary process. Preemption on a multi-host job must be agreed on by
all processes: see `PreemptionGuard`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax._src import distributed as _jax_distributed
from jax.experimental import multihost_utils

from hybridvlm.data.pipeline_checkpoint import ITERATOR_ITEM, restore_args, save_args

# Item names inside one checkpoint step.
STATE_ITEM = "state"
CONFIG_ITEM = "config"
# Suffix of the folder Orbax (0.12) writes a step into before renaming it to `<step>`.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def abstract_of(tree: Any) -> Any:
    """The restore target of `tree` laid out as it is now: a `jax.ShapeDtypeStruct` (shape,
    dtype, sharding) per array leaf. For restoring onto another layout, build the structs
    with that layout's shardings instead (e.g. from `jax.eval_shape` plus a sharding rule)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _check_abstract_state(abstract_state: Any) -> None:
    # Orbax would fall back to the sharding saved in the checkpoint, which names the devices
    # of the run that wrote it: wrong (or impossible) on another mesh. Insist on the caller's.
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        if getattr(leaf, "sharding", None) is None or not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(
                f"abstract_state{jax.tree_util.keystr(path)}: expected a jax.ShapeDtypeStruct with .sharding set "
                f"for the current mesh, got {leaf!r}")


def _json_config(config: Any) -> dict:
    # A copy made now: the write happens later in a background thread, and the caller may
    # change its config object meanwhile. ml_collections.ConfigDict has to_dict().
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (or have to_dict()), got {type(config).__name__}")
    return json.loads(json.dumps(config))


class TrainCheckpointer:
    """Periodic, asynchronous Orbax checkpoints of a training run, keeping the last `keep`.

    directory: the checkpoint root (created if missing); one sub-folder per step.
    save_every: `maybe_save(step, ...)` saves when `step % save_every == 0` (or when forced,
        or at a multi-host preemption sync point that JAX's preemption service reports).
    keep: how many of the newest steps to keep; older ones are deleted after each save.
    async_save: write in a background thread (default); False makes every save blocking.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.keep = int(keep)
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # The policy objects replace the deprecated `save_interval_steps` / `max_to_keep`
            # options. Orbax's default decision also saves the first step of a fresh run
            # (InitialSavePolicy); leaving it out makes saves happen exactly at multiples of
            # `save_every`, at forced steps and at preemption sync points.
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(self.save_every),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            preservation_policy=policies.LatestN(self.keep),
            enable_async_checkpointing=async_save,
            # Temporary folders left by a crashed save are garbage: remove them on start.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # -- queries ------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest step saved (None if none). A save this object started and that is
        still being written counts; folders of unfinished saves from earlier processes never do."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All steps kept, oldest first."""
        return sorted(self._manager.all_steps())

    def step_directory(self, step: int) -> str:
        """The folder of a finished step."""
        return os.path.join(self.directory, str(int(step)))

    # -- save ---------------------------------------------------------------------------

    def maybe_save(self, step: int, state: Any, *, data_iter: grain.DatasetIterator | None = None,
                   config: Any = None, force: bool = False) -> bool:
        """Saves `state` (plus the iterator and the config, when given) as checkpoint `step`
        if `step % save_every == 0`, `force` is set or a multi-host preemption sync point is
        reached; returns whether it saved. Never saves a step at or before the latest saved
        one (the step after a resume, or a forced final save that the interval already took).

        Call it on every process, every step, with the state after `step` updates and the
        iterator right after taking the batch of `step`: a restore then continues with the
        batch of `step + 1`. Returns before the files are written (see the module docstring).
        """
        step = int(step)
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        items: dict[str, ocp.args.CheckpointArgs] = {STATE_ITEM: ocp.args.StandardSave(state)}
        if config is not None:
            items[CONFIG_ITEM] = ocp.args.JsonSave(_json_config(config))
        args = save_args(data_iter, **items) if data_iter is not None else ocp.args.Composite(**items)
        # Without force, Orbax's own decision applies (interval, preemption sync point).
        return bool(self._manager.save(step, args=args, force=force))

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is written and committed."""
        self._manager.wait_until_finished()

    # -- restore ------------------------------------------------------------------------

    def restore(self, step: int | None = None, *, abstract_state: Any,
                data_iter: grain.DatasetIterator | None = None) -> tuple[Any, dict | None]:
        """Restores checkpoint `step` (default: the latest) and returns (state, config).

        abstract_state: the train-state pytree with a `jax.ShapeDtypeStruct` per leaf whose
            `.sharding` is the layout wanted now; the checkpoint may have been written on
            another number of devices or mesh shape. Typed PRNG keys restore as typed keys
            (give the key dtype, e.g. from `jax.eval_shape`).
        data_iter: a fresh iterator of the same pipeline; restored in place, so that its next
            element is the one the saved run would have taken next.
        config: the saved JSON config, or None if the step has none.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        step = int(step)
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} (have {self.all_steps()})")
        _check_abstract_state(abstract_state)
        step_dir = self.step_directory(step)
        items: dict[str, ocp.args.CheckpointArgs] = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
        has_config = os.path.isdir(os.path.join(step_dir, CONFIG_ITEM))
        if has_config:
            items[CONFIG_ITEM] = ocp.args.JsonRestore()
        if data_iter is not None:
            if not os.path.isdir(os.path.join(step_dir, ITERATOR_ITEM)):
                raise FileNotFoundError(f"{step_dir}: checkpoint has no data iterator state")
            args = restore_args(data_iter, **items)
        else:
            args = ocp.args.Composite(**items)
        restored = self._manager.restore(step, args=args)
        return restored[STATE_ITEM], (restored[CONFIG_ITEM] if has_config else None)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Waits for a pending save, then releases the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- preemption --------------------------------------------------------------------------


def preemption_service_active() -> bool:
    """Whether JAX's multi-host preemption service runs in this process: `jax.distributed`
    is initialised and `jax_enable_preemption_service` is on (the default). JAX then owns
    SIGTERM (its notifier is installed in C++) and all processes agree on a step to stop at
    through `multihost_utils.reached_preemption_sync_point`."""
    # Private module: JAX has no public accessor for whether the service was started.
    state = getattr(_jax_distributed, "global_state", None)
    return (state is not None and getattr(state, "client", None) is not None
            and getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionGuard:
    """Turns SIGTERM (a scheduler's preemption notice) into a flag the training loop polls.

    Single process: `install()` sets a Python handler that only records the signal, so the
    process keeps running; `should_stop()` is then True, and the loop saves (force=True) and
    leaves. `uninstall()` puts the previous handlers back. Repeated signals are recorded the
    same way (the loop is usually saving by then).

    Multi-host (`preemption_service_active()`): processes receive the notice at different
    times, but all must stop after the same step, or the collective save hangs. JAX's
    preemption service handles the signal and picks that step, so no Python handler is
    installed (it would hide the signal from JAX) and `should_stop(step)` asks
    `multihost_utils.reached_preemption_sync_point(step)`, which every process must call
    once per step with the same steps. `TrainCheckpointer.maybe_save` saves at that step
    even without force (Orbax asks the same service).

    `install` must run in the main thread (a Python rule for signal handlers).
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received: int | None = None  # the last signal number seen

    def _handle(self, signum, frame) -> None:
        # Only record: the loop decides when it is safe to stop (after a whole step).
        self.received = signum
        self._event.set()

    def install(self) -> PreemptionGuard:
        if self._previous:
            raise RuntimeError("PreemptionGuard is already installed")
        if not preemption_service_active():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were there before `install`."""
        previous, self._previous = self._previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def request_stop(self) -> None:
        """Sets the flag as a signal would (e.g. for a stop requested by other means). Under
        jax.distributed every process must request it after the same step."""
        self._event.set()

    def should_stop(self, step: int | None = None) -> bool:
        """True once the loop should save and exit. Multi-host: pass the step just finished
        (required there: the answer is "this is the agreed step")."""
        if preemption_service_active():
            if step is None:
                raise ValueError("should_stop(step) needs the step under jax.distributed: "
                                 "the processes agree on the step to stop at")
            return self._event.is_set() or multihost_utils.reached_preemption_sync_point(int(step))
        return self._event.is_set()

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_sigterm_handler() -> PreemptionGuard:
    """Installs and returns a `PreemptionGuard` for SIGTERM; call `.uninstall()` when done."""
    return PreemptionGuard().install()


@contextlib.contextmanager
def preemption_guard(signals: Sequence[int] = (signal.SIGTERM,)) -> Iterator[PreemptionGuard]:
    """`with preemption_guard() as guard:` ... `guard.should_stop(step)`; the previous
    signal handlers are restored on exit (also on an exception)."""
    guard = PreemptionGuard(signals).install()
    try:
        yield guard
    finally:
        guard.uninstall()
