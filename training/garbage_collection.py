"""Python's garbage collector during training: the objects alive after the compiling steps leave its
scans, and the host time of its collections is counted for the step metrics.

A full collection (generation 2) walks every object the collector tracks. Once the layers are
compiled, those are millions (the compiler's graphs and caches, megatron-core's and DeepSpeed's
structures): one such collection held the host for about 0.5 s in a 1.3B step on an H100, while the
GPU's queue ran dry. Frozen, they stay alive and are never scanned again; what training allocates
later is collected as before.
"""

from __future__ import annotations

import gc
import time
from typing import Optional


class CollectionTimer:
    """Host seconds spent in Python's garbage collections since the last ``take()``, through gc.callbacks."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._started: Optional[float] = None

    def _on_collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._started = None

    def install(self) -> None:
        if self._on_collection not in gc.callbacks:
            gc.callbacks.append(self._on_collection)

    def remove(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)

    def take(self) -> float:
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def freeze_live_objects() -> None:
    """Collect once, then move every object still alive out of all later collections' scans."""
    gc.collect()
    gc.freeze()


def unfreeze_objects() -> None:
    """Give the frozen objects back to the collector (a trainer that is closed no longer needs them)."""
    gc.unfreeze()
