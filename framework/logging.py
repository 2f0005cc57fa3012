"""Metric outputs of a run: console progress, ``metrics.jsonl``, TensorBoard events, PNG curves.

Only process 0 writes; other processes get a :class:`MetricLogger` whose writes do nothing, so the
trainer calls it unconditionally. A resumed run appends to the same ``metrics.jsonl``, first dropping the
records an interrupted attempt wrote after the checkpoint it resumes from (they are computed again).

Every JSON file a run writes is strict JSON (:func:`to_json`): a non-finite number (a NaN loss, an infinite
gradient norm) is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, which ``float()`` reads back.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"


def json_safe(value):
    """``value`` with every non-finite float (also inside dicts, lists and tuples) as ``"nan"``/``"inf"``/``"-inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """Strict JSON of ``value`` (:func:`json_safe`; ``json.dumps`` would write the invalid ``NaN``)."""
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def drop_records_after(path: Path, step: int) -> None:
    """Remove the records of ``path`` (a ``metrics.jsonl``) past ``step``; the file is replaced atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len([line for line in lines if line.strip()]):
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept))
        partial.replace(path)


class MetricLogger:
    """Writes scalar metrics for a step to every enabled sink."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, steps_per_epoch: float,
                 enabled: bool = True, progress: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.steps_per_epoch = steps_per_epoch
        if enabled and start_step > 0:
            drop_records_after(self.run_dir / METRICS_FILE, start_step)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a") if enabled else None  # noqa: SIM115
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._bar = None
        if enabled and progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             desc="train", smoothing=0.1)
        self._last = (time.perf_counter(), start_step)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (names like ``train/loss``, ``eval/accuracy``) at ``step``."""
        if not self.enabled:
            return
        record = {"step": step, "epoch": round(step / self.steps_per_epoch, 4), "time": time.time(), **metrics}
        self._jsonl.write(to_json(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)

    def progress(self, step: int, *, loss: float, images_per_step: int) -> float:
        """Advance the bar to ``step`` and show loss, epoch and throughput; returns images/s."""
        now = time.perf_counter()
        last_time, last_step = self._last
        rate = (step - last_step) * images_per_step / max(now - last_time, 1e-9)
        self._last = (now, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(epoch=f"{step / self.steps_per_epoch:.2f}", loss=f"{loss:.4f}",
                                  img_s=f"{rate:,.0f}", refresh=False)
        return rate

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(run_dir: Path) -> Path | None:
    """One PNG with a panel per metric (train and eval curves over steps); None when nothing logged."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in read_metrics(run_dir):
        for name, value in record.items():
            if "/" in name and isinstance(value, int | float) and math.isfinite(value):
                series[name].append((record["step"], value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        steps, values = zip(*sorted(series[name]), strict=True)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(run_dir) / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
