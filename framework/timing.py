"""Where a run's wall time goes, and when it first reached an accuracy.

:class:`Phases` sums the seconds spent in named phases (``prepare``, ``compile``, ``train``, ``eval``,
``checkpoint``, ...); ``result.json``'s ``timing`` is its record plus ``startup_s`` (process start to the
run's construction: interpreter, imports, Hydra). :class:`TimeTo` records, for each target of
``train.time_to``, the first evaluation at which ``checkpoint.best_metric`` reached it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

_IMPORTED_AT = time.time()


def process_seconds() -> float:
    """Seconds since this process started (since this module's import where the OS does not say)."""
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or the platform refuses: fall back
        return time.time() - _IMPORTED_AT


class Phases:
    """Accumulated wall seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def record(self, startup_s: float) -> dict[str, float]:
        """``{startup_s, <phase>_s, ...}`` rounded to milliseconds."""
        return {"startup_s": round(startup_s, 3), **{f"{k}_s": round(v, 3) for k, v in self.seconds.items()}}


class TimeTo:
    """First times at which a metric reached each of ``targets`` (``mode`` 'max': >=, 'min': <=)."""

    def __init__(self, targets: Sequence[float], mode: str = "max") -> None:
        self.mode = mode
        self.reached: dict[str, dict | None] = {str(float(t)): None for t in targets}

    def reaches(self, value: float, target: float) -> bool:
        return value >= target if self.mode == "max" else value <= target

    def update(self, value: float | None, step: int, first_step_at: float | None) -> None:
        """Record the targets ``value`` (at ``step``) reaches for the first time."""
        if value is None:
            return
        for key, hit in self.reached.items():
            if hit is None and self.reaches(value, float(key)):
                from_first = time.perf_counter() - first_step_at if first_step_at is not None else None
                self.reached[key] = {"from_start_s": round(process_seconds(), 3),
                                     "from_first_step_s": None if from_first is None else round(from_first, 3),
                                     "step": step, "value": value}
