"""``prism bench infer checkpoint=RUN_DIR|FILE [device=cpu|gpu] [batch=1,8,64]``: inference latency and throughput
of JAX and of onnxruntime for the same model, in one process.

For a run directory the model is the run's exported inference function (:mod:`prism.framework.export`: uint8
images in, normalization and the model in evaluation mode inside): JAX runs it jitted on ``device``, onnxruntime
runs its ONNX conversion (dynamic batch, converted in memory). A file is benchmarked on its own engine: ``.onnx``
with onnxruntime, ``.stablehlo`` (``prism export format=stablehlo``) with JAX. Inputs are seeded random uint8
images of the model's input shape (the time does not depend on the pixels). Each (engine, batch) is run
``bench.warmup`` times untimed (compilation included for JAX), then ``bench.iters`` times; the record gives the
median and 95th percentile latency in ms and the throughput (images/s at the median). ``device=gpu`` runs JAX on
the GPU and onnxruntime with its CUDA provider when the installed onnxruntime has one (else it says so).

The JSON goes to ``RUN_DIR/bench/infer-<time>.json``, or for a file to ``benchmarks/results/infer-<name>-<time>.json``
(``out=FILE`` to choose).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prism.framework.errors import ConfigError
from prism.framework.export import number_option

OPTIONS = ("checkpoint", "device", "batch", "step", "out", "bench.iters", "bench.warmup", "bench.threads")
RESULTS_DIR = Path("benchmarks") / "results"


def time_calls(call: Callable[[], Any], *, iters: int, warmup: int) -> dict[str, float]:
    """Median and p95 latency (ms) of ``call()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95)), "iters": iters}


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.strip("[]").split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ConfigError(f"batch must be a comma-separated list of positive integers (batch=1,8,64), got {text!r}")
    return batches



def _jax_device(device: str):
    try:
        return jax.devices(device)[0]
    except RuntimeError:
        raise ConfigError(f"device={device}: JAX has no {device} backend here (backends: "
                          f"{', '.join(sorted({d.platform for d in jax.devices()}))})") from None


def _onnx_session(model, device: str, threads: int):
    import onnxruntime as ort

    from prism.framework.export import onnx_session

    if device == "gpu":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return None, "the installed onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        options = ort.SessionOptions()
        source = model if isinstance(model, bytes) else str(model)
        return ort.InferenceSession(source, options, providers=["CUDAExecutionProvider"]), None
    return onnx_session(model, threads), None


def bench(options: dict[str, str]) -> dict[str, Any]:
    """Time the engines over the batch sizes (see the module docstring); returns the record."""
    from prism.framework.export import export_onnx, inference_function, input_spec, load

    device = options.get("device", "cpu")
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"device must be cpu or gpu, got {device!r}")
    batches = _parse_batches(options.get("batch", "1,8,64"))
    iters = number_option(options, "bench.iters", 30, int, 1)
    warmup = number_option(options, "bench.warmup", 3, int, 0)
    threads = number_option(options, "bench.threads", 0, int, 0)
    source = Path(options["checkpoint"])
    if not source.exists():
        raise ConfigError(f"checkpoint={source}: no such run directory or model file")
    jax_fn = onnx_model = None
    record: dict[str, Any] = {"source": str(source.absolute()), "device": device}
    if source.is_dir():
        run, step = load(str(source), options.get("step", "best"))
        fn, meta = inference_function(run)
        shape = tuple(run.info.image_shape)
        jax_fn = jax.jit(fn)  # runs where its (device_put) input lives
        outputs = len(jax.eval_shape(fn, input_spec(shape, 1)))
        onnx_model = export_onnx(fn, input_spec(shape, None), [f"output_{i}" for i in range(outputs)])
        record.update(step=step, model=meta["model"], image_shape=list(shape))
    elif source.suffix == ".onnx":
        onnx_model = source
        probe, _ = _onnx_session(source, "cpu", 1)
        dims = probe.get_inputs()[0].shape
        shape = tuple(int(d) for d in dims[1:])
        if isinstance(dims[0], int):
            batches = [dims[0]]
        record.update(model=source.name, image_shape=list(shape))
    elif source.suffix == ".stablehlo":
        exported = jax.export.deserialize(bytearray(source.read_bytes()))
        dims = exported.in_avals[0].shape
        shape = tuple(int(d) for d in dims[1:])
        try:
            batches = [int(dims[0])]
        except Exception:  # a symbolic batch: every requested size
            pass
        jax_fn = jax.jit(exported.call)
        record.update(model=source.name, image_shape=list(shape))
    else:
        raise ConfigError(f"checkpoint={source}: a run directory, a .onnx or a .stablehlo file")
    rng = np.random.default_rng(0)
    results, notes = [], []
    session = None
    if onnx_model is not None:
        session, note = _onnx_session(onnx_model, device, threads)
        if note:
            notes.append(note)
    for batch in batches:
        images = rng.integers(0, 256, (batch, *shape), dtype=np.uint8)
        if jax_fn is not None:
            on_device = jax.device_put(images, _jax_device(device))
            timing = time_calls(lambda x=on_device: jax.block_until_ready(jax_fn(x)), iters=iters, warmup=warmup)
            results.append({"engine": "jax", "batch": batch, **timing})
        if session is not None:
            name = session.get_inputs()[0].name
            timing = time_calls(lambda x=images, n=name: session.run(None, {n: x}), iters=iters, warmup=warmup)
            results.append({"engine": "onnxruntime", "batch": batch, **timing})
    for r in results:
        r["images_per_s"] = r["batch"] / (r["median_ms"] / 1e3)
    import onnxruntime as ort

    record.update(results=results, notes=notes, warmup=warmup, threads=threads or "default",
                  host={"cpus": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
                        "load_average_1min": os.getloadavg()[0]},
                  jax_backend=jax.default_backend(), jax=jax.__version__, onnxruntime=ort.__version__,
                  onnxruntime_providers=ort.get_available_providers())
    return record


def main(args: Sequence[str]) -> int:
    from prism.framework.export import parse_options

    options = parse_options(args, OPTIONS, "bench infer")
    record = bench(options)
    source = Path(options["checkpoint"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    default = (source / "bench" / f"infer-{stamp}.json" if source.is_dir()
               else RESULTS_DIR / f"infer-{source.stem}-{stamp}.json")
    out = Path(options.get("out") or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for r in record["results"]:
        print(f"infer: {r['engine']:<11} batch {r['batch']:>3}: {r['median_ms']:.3f} ms median, {r['p95_ms']:.3f} ms "
              f"p95, {r['images_per_s']:,.0f} img/s")
    for note in record["notes"]:
        print(f"infer: note: {note}")
    print(f"wrote {out}")
    return 0
