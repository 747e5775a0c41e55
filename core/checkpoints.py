"""Orbax checkpoints of a training state, one directory per minibatch step.

Each checkpoint holds the whole ``TrainState`` (params, BatchNorm statistics, optimizer state,
step and key) plus a small JSON record (epoch, phase, ...). Restoring needs an abstract target
(shapes and dtypes of a state of the same structure) so that NamedTuple optimizer states come
back as NamedTuples. Orbax writes into a temporary directory and renames it when complete, so a
checkpoint directory that exists under its final name is whole.

Whole is not intact: orbax's compressed array files carry no checksum, so a flipped byte can
restore without error as different parameters, and another step's ``state/`` restores too. The
JSON record therefore holds ``digest``, the SHA-256 of the step and of every array of the state
(``state_digest``), written at save and checked at restore: a mismatch is a
``DamagedCheckpoint``, which the experiment sets aside and remakes like a truncated file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from core.timing import timed

State = TypeVar("State")

logging.getLogger("absl").setLevel(logging.WARNING)
LOG = logging.getLogger(__name__)


class DamagedCheckpoint(RuntimeError):
    """A stored checkpoint cannot be read back (truncated or half-written files)."""

    def __init__(self, step: int, cause: BaseException):
        super().__init__(f"checkpoint at step {step} is damaged ({type(cause).__name__}: "
                         f"{str(cause).splitlines()[0][:200] if str(cause) else ''})")
        self.step = step


def state_digest(step: int, state: Any) -> str:
    """SHA-256 over the step and, in tree order, every leaf's path, dtype, shape and bytes."""
    h = hashlib.sha256(f"step {int(step)}\n".encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _record(step: int, meta: Any) -> tuple[dict[str, Any], str | None]:
    """A checkpoint's JSON record as its caller saved it, and the store's digest (None in a
    checkpoint written before digests); DamagedCheckpoint if there is no record."""
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(step, ValueError("no JSON record"))
    meta = dict(meta)
    return meta, meta.pop("digest", None)


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
            meta = {**meta, "digest": state_digest(step, state)}
            args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta))
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()

    def restore(self, step: int, like: State) -> tuple[State, dict[str, Any]]:
        """Restores checkpoint ``step`` into the structure of ``like`` (arrays or shape structs).

        Raises:
          DamagedCheckpoint: its files cannot be read back, or what they hold is not what was
            saved as this step (digest mismatch).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        )
        with timed("checkpoint"):
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                raise DamagedCheckpoint(step, e) from e
            meta, saved = _record(step, restored.meta)
            if saved is None:  # written before checkpoints carried digests
                LOG.warning("checkpoint at step %d has no digest: restored unverified", step)
            elif saved != state_digest(step, restored.state):
                raise DamagedCheckpoint(step, ValueError(
                    "its arrays are not those saved at this step (digest mismatch)"))
        return restored.state, meta

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON record of checkpoint ``step`` (DamagedCheckpoint if unreadable)."""
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        try:
            meta = self._manager.restore(step, args=args).meta
        except Exception as e:  # noqa: BLE001
            raise DamagedCheckpoint(step, e) from e
        return _record(step, meta)[0]

    def quarantine(self, step: int) -> Path:
        """Moves a damaged checkpoint aside (``damaged-<step>-<time>``, kept for inspection)
        so that it is no longer one of ``steps()``; returns where it went."""
        import time

        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in range(1000):  # the same step set aside again within a second gets -1, -2, ...
            target = self.directory / (f"damaged-{step}-{stamp}" + (f"-{n}" if n else ""))
            if target.exists():
                continue
            try:
                (self.directory / str(step)).rename(target)
            except FileNotFoundError:  # another process set it aside first
                break
            except OSError:  # another process took this name first (ENOTEMPTY): next one
                continue
            break
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.close()
