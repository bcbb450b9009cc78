"""Save and restore a pipeline iterator with Orbax, alone or beside the model state.

grain registers `grain.checkpoint.CheckpointSave` / `CheckpointRestore` as Orbax
checkpoint args: each process writes its own iterator state
(`process_<i>-of-<n>.json`) into the step's item directory. A training loop
saves the iterator in the same step as the model, in one CheckpointManager:

    mngr = ocp.CheckpointManager(workdir)
    mngr.save(step, args=save_args(it, state=ocp.args.StandardSave(state)))
    ...
    restored = mngr.restore(step, args=restore_args(it, state=ocp.args.StandardRestore(abstract_state)))
    # `it` now yields exactly the batches the interrupted run would have yielded next.

Save the iterator right after taking the last batch the saved model state has seen
(the state is the position after that batch).
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

# The iterator's item name in a CheckpointManager step.
ITERATOR_ITEM = "data_iter"


def save_args(it: grain.DatasetIterator, **items: ocp.args.CheckpointArgs) -> ocp.args.Composite:
    """Composite save args: `items` (e.g. state=ocp.args.StandardSave(state)) plus the iterator."""
    return ocp.args.Composite(**items, **{ITERATOR_ITEM: grain.checkpoint.CheckpointSave(it)})


def restore_args(it: grain.DatasetIterator, **items: ocp.args.CheckpointArgs) -> ocp.args.Composite:
    """Composite restore args: `items` plus the iterator (restored in place)."""
    return ocp.args.Composite(**items, **{ITERATOR_ITEM: grain.checkpoint.CheckpointRestore(it)})


def _manager(manager_or_dir: ocp.CheckpointManager | str | os.PathLike) -> tuple[ocp.CheckpointManager, bool]:
    if isinstance(manager_or_dir, ocp.CheckpointManager):
        return manager_or_dir, False
    return ocp.CheckpointManager(os.path.abspath(os.fspath(manager_or_dir))), True


def save_iterator(manager_or_dir: ocp.CheckpointManager | str | os.PathLike, step: int,
                  it: grain.DatasetIterator) -> None:
    """Saves the iterator's state as checkpoint `step` (waits for the write to finish)."""
    manager, own = _manager(manager_or_dir)
    manager.save(step, args=save_args(it))
    manager.wait_until_finished()
    if own:
        manager.close()


def restore_iterator(manager_or_dir: ocp.CheckpointManager | str | os.PathLike, it: grain.DatasetIterator,
                     step: int | None = None) -> grain.DatasetIterator:
    """Restores `it` (a fresh iterator of the same pipeline) to checkpoint `step` (default:
    the latest) and returns it."""
    manager, own = _manager(manager_or_dir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{manager.directory}: no checkpoint to restore the data iterator from")
        manager.restore(step, args=restore_args(it))
    finally:
        if own:
            manager.close()
    return it
