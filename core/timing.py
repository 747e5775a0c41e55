"""Process-wide wall-time totals of named activities (checkpointing, tracking, reporting), so a
trial can say how much of its time went outside JAX compute. Take a snapshot before, subtract
after: ``since(snapshot())``."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

_TOTALS: defaultdict[str, float] = defaultdict(float)


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    """Adds the wall time of the block to the total of ``name``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _TOTALS[name] += time.perf_counter() - start


def snapshot() -> dict[str, float]:
    return dict(_TOTALS)


def since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per activity since ``before`` (a ``snapshot()``)."""
    return {k: v - before.get(k, 0.0) for k, v in _TOTALS.items()}
