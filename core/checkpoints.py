"""Orbax checkpoints of a training state, one directory per minibatch step.

Each checkpoint holds the whole ``TrainState`` (params, BatchNorm statistics, optimizer state,
step and key) plus a small JSON record (epoch, phase, ...). Restoring needs an abstract target
(shapes and dtypes of a state of the same structure) so that NamedTuple optimizer states come
back as NamedTuples. Orbax writes into a temporary directory and renames it when complete, so a
checkpoint directory that exists under its final name is whole.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp

from core.timing import timed

State = TypeVar("State")

logging.getLogger("absl").setLevel(logging.WARNING)


class CheckpointStore:
    """Saves and restores states of one trajectory under ``directory/<step>``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes ``state`` and JSON-serialisable ``meta`` as checkpoint ``step`` (idempotent)."""
        with timed("checkpoint"):
            if step in self.steps():
                return
            args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta))
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()

    def restore(self, step: int, like: State) -> tuple[State, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure of ``like`` (arrays or shape structs)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        with timed("checkpoint"):
            restored = self._manager.restore(step, args=args)
        return restored.state, restored.meta

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step``."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args).meta

    def close(self) -> None:
        self._manager.close()
