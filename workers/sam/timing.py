"""One timing context for the engine's stages: ``with timer.stage("decode"): ...`` adds up seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    def __init__(self, *stages: str) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)
        self._started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def report(self) -> dict[str, float]:
        """Seconds per stage as ``<stage>_s`` plus ``total_s`` since the timer was made."""
        out = {f"{name}_s": seconds for name, seconds in self.seconds.items()}
        out["total_s"] = time.perf_counter() - self._started
        return out
