"""``prism bench train``: speed of the real training step of any model + objective config.

The step timed is the Run's own training step (:class:`~prism.framework.train_programs.TrainPrograms`, the
one ``prism train`` runs: augmentation, forward, backward, optimizer update, EMA/NaN guard, on the sharded global
batch), built from the same composed config. Two data modes:

- ``synthetic``: one global batch from the dataset is put on the devices once and fed to every step,
  so the figure is the device's compute alone (use ``dataset=synthetic`` for any resolution);
- ``pipeline``: every step takes its batch from the real host input pipeline, as training does;
- ``device``: the step timed on one batch as ``synthetic``, then images/s of ``fit``'s own calls on the
  device path (``loader.placement=device``: ``steps_per_call`` steps per call, each gathering its batch
  from the training split kept on the devices); ``index_ms`` is the host's time for one batch of indices.

Reported: compile time (``compile_cached`` says when the persistent compilation cache served the step
instead, :mod:`prism.framework.compilation_cache`), median step time over synced steps, images/s over an unsynced
window (the
loop as ``fit`` runs it), the step's convolution + matmul FLOPs (:mod:`prism.framework.flops`; XLA's own cost
analysis is reported beside it but misses cuDNN convolutions on GPU), MFU against the device's peak dense
FLOP/s (known devices or ``--peak-tflops``), and peak device memory where the backend reports it.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
from omegaconf import DictConfig

from prism.framework import compilation_cache, parallel
from prism.framework.data import train_iterator
from prism.framework.device_prefetch import DevicePrefetcher
from prism.framework.errors import ConfigError
from prism.framework.flops import function_flops
from prism.framework.run import Run
from prism.framework.train_programs import TrainPrograms

#: Peak dense tensor FLOP/s per device (bf16; fp32 runs use TF32, half that), from the vendors' data sheets.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0}


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        return sum(_flops(c) for c in cost)
    return float((cost or {}).get("flops", 0.0))


def peak_tflops(device: jax.Device, precision: str) -> float | None:
    """The device's peak dense TFLOP/s at ``precision`` when it is a known GPU, else None."""
    kind = getattr(device, "device_kind", "")
    for name, bf16 in PEAK_TFLOPS.items():
        if name in kind:
            return bf16 if precision == "bf16" else bf16 / 2
    return None


def _peak_memory(devices: list[jax.Device]) -> int | None:
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s.get("peak_bytes_in_use") for s in stats]
    return max(peaks) if all(p is not None for p in peaks) and peaks else None


DATA_MODES = ("synthetic", "pipeline", "device")


def _index_ms(indices, n: int) -> float:
    """Milliseconds per batch of example indices read from the device path's index stream."""
    started = time.perf_counter()
    for _ in range(n):
        next(indices)
    return (time.perf_counter() - started) / n * 1e3


def _timed_steps(step, state, next_batch, *, steps: int, warmup: int) -> tuple[Any, dict, list[float], float]:
    """``(state, last logs, synced step seconds, seconds of an unsynced window of ``steps`` steps)``."""
    for _ in range(warmup):
        state, logs = step(state, next_batch())
    jax.block_until_ready(logs)
    synced = []
    for _ in range(steps):  # each step waited for: the step time alone
        started = time.perf_counter()
        state, logs = step(state, next_batch())
        jax.block_until_ready(logs)
        synced.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(steps):  # as fit() runs: dispatch overlaps the previous step (and host loading)
        state, logs = step(state, next_batch())
    jax.block_until_ready(logs)
    return state, logs, synced, time.perf_counter() - started


def _timed_calls(run: Run, programs: TrainPrograms, steps: int) -> tuple[float, int, float]:
    """fit's own device-path calls on ``run.state``: ``(window seconds, steps in it, index ms per batch)``."""
    stream, call = programs.calls()
    per_call = programs.steps_per_call
    calls = -(-steps // per_call)
    jax.block_until_ready(call(per_call))
    started = time.perf_counter()
    for _ in range(calls):
        logs = call(per_call)
    jax.block_until_ready(logs)
    window_s = time.perf_counter() - started
    return window_s, calls * per_call, _index_ms(stream, max(steps, 20))


def _record(cfg: DictConfig, run: Run, data: str, timings: dict[str, Any], peak: float | None) -> dict[str, Any]:
    devices = run.mesh.devices.flatten().tolist()
    synced, t = timings.pop("synced"), cfg.train
    step_s = statistics.median(synced)
    peak = peak if peak is not None else peak_tflops(devices[0], cfg.precision)
    flops = timings["flops"]
    return {
        "model": cfg.model.name, "objective": cfg.objective.name, "dataset": cfg.dataset.name, "data": data,
        "image_shape": list(run.info.image_shape), "batch_size": t.batch_size, "precision": cfg.precision,
        "params": run.param_count, "steps": timings["steps"], "warmup": timings["warmup"],
        "build_s": round(timings["build_s"], 3), "compile_s": round(timings["compile_s"], 3),
        "compile_cached": timings["compile_cached"],
        "step_ms_median": step_s * 1e3, "step_ms_min": min(synced) * 1e3, "step_ms_max": max(synced) * 1e3,
        "img_s_median_step": t.batch_size / step_s,
        "img_s": timings["window_steps"] * t.batch_size / timings["window_s"],
        "steps_per_call": timings["steps_per_call"],
        "model_tflops_per_step": flops / 1e12,
        "xla_cost_analysis_tflops_per_device": timings["xla_flops"] / 1e12,
        "peak_tflops_per_device": peak,
        "mfu": flops / len(devices) / step_s / (peak * 1e12) if peak and flops else None,
        "peak_memory_bytes": _peak_memory(devices), "index_ms": timings["index_ms"],
        "final_loss": timings["final_loss"], "devices": len(devices), "batch_stats": cfg.parallel.batch_stats,
        "device_kind": devices[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
    }


def bench_train(cfg: DictConfig, *, steps: int = 20, warmup: int = 5, data: str = "synthetic",
                peak: float | None = None, profile: str | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` (see the module docstring); with ``profile``,
    then trace 5 more steps with ``jax.profiler`` into that directory."""
    if steps < 1 or warmup < 1:
        raise ConfigError(f"--steps and --warmup must be >= 1, got {steps} and {warmup}")
    if data not in DATA_MODES:
        raise ConfigError(f"--data must be one of {', '.join(DATA_MODES)}, got {data!r}")
    if data == "device":
        cfg = cfg.copy()
        cfg.loader.placement = "device"
    started = time.perf_counter()
    run = Run(cfg)
    programs = TrainPrograms(run)
    timings: dict[str, Any] = {"build_s": time.perf_counter() - started, "steps": steps, "warmup": warmup}
    t = cfg.train
    batches = train_iterator(run.train_split, global_batch=t.batch_size, host=run.host, seed=cfg.seed,
                             shuffle=cfg.loader.shuffle, workers=cfg.loader.workers, threads=cfg.loader.threads,
                             prefetch=cfg.loader.prefetch)
    fixed = parallel.global_batch(run.mesh, next(batches))
    if data == "pipeline" and cfg.loader.device_prefetch > 0:  # read and copied ahead, as training's host path
        batches = DevicePrefetcher(batches, functools.partial(parallel.global_batch, run.mesh),
                                   depth=cfg.loader.device_prefetch)

    def next_batch():
        if data != "pipeline":
            return fixed
        batch = next(batches)
        return batch if isinstance(batches, DevicePrefetcher) else parallel.global_batch(run.mesh, batch)

    started, cache_before = time.perf_counter(), compilation_cache.stats()
    step = programs.step.lower(run.state, fixed).compile()
    timings["compile_s"] = time.perf_counter() - started
    timings["compile_cached"] = compilation_cache.stats()["hits"] > cache_before["hits"]  # loaded, not compiled
    timings["xla_flops"] = _flops(step.cost_analysis())  # backend-dependent: on GPU cuDNN convolutions count ~0
    timings["flops"] = function_flops(programs.step, run.state, fixed)  # conv + matmul, whole global batch
    state, logs, timings["synced"], timings["window_s"] = _timed_steps(step, run.state, next_batch, steps=steps,
                                                                       warmup=warmup)
    timings.update(window_steps=steps, final_loss=float(logs["train/loss"]), index_ms=None, steps_per_call=1)
    if data == "device":  # fit's own calls: steps_per_call steps each, batches gathered on the device
        run.state = state
        timings["window_s"], timings["window_steps"], timings["index_ms"] = _timed_calls(run, programs, steps)
        timings["steps_per_call"] = programs.steps_per_call
        state = run.state
    if profile:  # a few more steps under the profiler: a TensorBoard/Perfetto trace in ``profile``
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for _ in range(min(steps, 5)):
                state, logs = step(state, next_batch())
            jax.block_until_ready(logs)
    return _record(cfg, run, data, timings, peak)


def summary_line(r: dict[str, Any]) -> str:
    mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
    mem = f", peak mem {r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else ""
    return (f"train: {r['model']}/{r['objective']} batch={r['batch_size']} {r['precision']} {r['data']} on "
            f"{r['devices']}x {r['device_kind']}: {r['img_s']:,.0f} img/s ({r['step_ms_median']:.1f} ms/step median), "
            f"compile {r['compile_s']:.1f} s{' (loaded from the compilation cache)' if r.get('compile_cached') else ''}"
            f"{mfu}{mem}")
