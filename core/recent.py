"""A process's caches of the most recently used things (compiled programs, kernel engines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def recent(cache: dict[K, V], key: K, build: Callable[[], V], limit: int) -> V:
    """``cache[key]``, built by ``build()`` when missing, and made the most recent (dicts keep
    insertion order: most recent last); the least recent go past ``limit`` entries."""
    value = cache.pop(key) if key in cache else build()
    cache[key] = value
    while len(cache) > limit:
        del cache[next(iter(cache))]
    return value
