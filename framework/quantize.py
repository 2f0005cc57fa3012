"""Static int8 post-training quantization of a saved run: ``prism quantize checkpoint=RUN_DIR [calibration=N]``.

The run's inference function is exported to ONNX (:mod:`prism.framework.export`, parity gate included: fp32 ONNX
against JAX on evaluation images), pre-processed (``onnxruntime.quantization.quant_pre_process``: shape inference
and graph optimization) and quantized by ``onnxruntime.quantization.quantize_static``: QDQ format, int8 weights
per output channel, uint8 activations per tensor with min/max ranges calibrated on ``calibration`` (default 256)
training images drawn with the run's seed (uint8, fed as the graph takes them). The report, ``quantize.json`` in
``out`` (default ``RUN_DIR/quantize/``) beside ``model-fp32.onnx`` and ``model-int8.onnx``: top-1 accuracy of JAX,
the fp32 and the int8 ONNX model on the whole evaluation split (classification runs; other tasks get the int8
outputs' agreement with fp32), the int8 model's QuantizeLinear/DequantizeLinear node count, the file sizes, and
onnxruntime CPU latency at batch 1 (median and p95 over ``quantize.iters`` calls).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from prism.framework.errors import ConfigError
from prism.framework.export import number_option

OPTIONS = ("checkpoint", "calibration", "step", "out", "quantize.iters", "quantize.batch", "export.images",
           "export.atol", "export.rtol")



def _images(split, indices: Sequence[int]) -> np.ndarray:
    return np.stack([np.asarray(split[int(i)]["image"], np.uint8) for i in indices])


def _batched(runner, images: np.ndarray, batch: int) -> list[np.ndarray]:
    parts = [runner(images[i:i + batch]) for i in range(0, len(images), batch)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def quantize(options: dict[str, str]) -> dict[str, Any]:
    """Export, quantize and compare (see the module docstring); returns the ``quantize.json`` record."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ConfigError(f"prism quantize needs onnxruntime ({exc}); install it with "
                          f'pip install -e ".[export]"') from None
    import onnx

    from prism.framework.bench_infer import time_calls
    from prism.framework.export import (
        ParityError,
        _parity_line,
        compare,
        eval_images,
        export_onnx,
        inference_function,
        input_spec,
        load,
        onnx_runner,
    )

    calibration = number_option(options, "calibration", 256, int, 1)
    iters = number_option(options, "quantize.iters", 50, int, 1)
    batch = number_option(options, "quantize.batch", 64, int, 1)
    started = time.perf_counter()
    run_dir = Path(options["checkpoint"])
    run, step = load(str(run_dir), options.get("step", "best"))
    out = Path(options.get("out") or run_dir / "quantize")
    out.mkdir(parents=True, exist_ok=True)
    fn, meta = inference_function(run)
    shape = tuple(run.info.image_shape)
    names = [f"output_{i}" for i in range(len(jax.eval_shape(fn, input_spec(shape, 1))))]
    fp32_path, pre_path, int8_path = out / "model-fp32.onnx", out / "model-fp32-pre.onnx", out / "model-int8.onnx"
    fp32_path.write_bytes(export_onnx(fn, input_spec(shape, None), names))
    jitted = jax.jit(fn)
    check = eval_images(run, number_option(options, "export.images", 32, int, 1))
    atol, rtol = number_option(options, "export.atol", 1e-4), number_option(options, "export.rtol", 1e-4)
    parity = compare([np.asarray(o) for o in jitted(check)], onnx_runner(fp32_path)(check), atol=atol, rtol=rtol)
    if not parity["passed"]:
        raise ParityError(_parity_line({"format": "onnx", "file": str(fp32_path),
                                        "parity": {"images": len(check), "atol": atol, "rtol": rtol, **parity}}))
    quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)

    train = run.train_split
    picked = np.random.default_rng(run.cfg.seed).permutation(len(train))[:min(calibration, len(train))]
    calib = _images(train, picked)

    class Reader(CalibrationDataReader):
        """The calibration images, ``batch`` at a time."""

        def __init__(self) -> None:
            self.batches = iter([calib[i:i + batch] for i in range(0, len(calib), batch)])

        def get_next(self):
            images = next(self.batches, None)
            return None if images is None else {"image": images}

    quantize_static(str(pre_path), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    pre_path.unlink()
    ops: dict[str, int] = {}
    for node in onnx.load(str(int8_path)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1

    split = run.eval_split
    everything = _images(split, range(len(split)))
    outputs = {"jax": [np.asarray(o) for o in _batched(lambda x: [np.asarray(o) for o in jitted(x)], everything,
                                                         batch)],
               "fp32": _batched(onnx_runner(fp32_path), everything, batch),
               "int8": _batched(onnx_runner(int8_path), everything, batch)}
    metrics: dict[str, Any] = {}
    labels = np.asarray([split[i]["label"] for i in range(len(split))]) if "label" in split[0] else None
    if labels is not None and outputs["jax"][0].ndim == 2:
        for engine, outs in outputs.items():
            metrics[f"{engine}_accuracy"] = float(np.mean(outs[0].argmax(-1) == labels))
        metrics["int8_minus_fp32_points"] = 100 * (metrics["int8_accuracy"] - metrics["fp32_accuracy"])
    metrics["int8_vs_fp32_max_abs_diff"] = max(float(np.max(np.abs(a - b)))
                                               for a, b in zip(outputs["int8"], outputs["fp32"], strict=True))
    if outputs["jax"][0].ndim == 2:
        metrics["int8_vs_fp32_top1_agreement"] = float(np.mean(outputs["int8"][0].argmax(-1)
                                                               == outputs["fp32"][0].argmax(-1)))
    one = everything[:1]
    latency = {}
    for engine, path in (("fp32", fp32_path), ("int8", int8_path)):
        from prism.framework.export import onnx_session

        session = onnx_session(path)
        latency[engine] = time_calls(lambda s=session: s.run(None, {"image": one}), iters=iters, warmup=5)
    latency["jax"] = time_calls(lambda: jax.block_until_ready(jitted(one)), iters=iters, warmup=5)
    record = {
        "checkpoint": str(run_dir.absolute()), "step": step, "model": meta["model"], "task": meta["task"],
        "dataset": run.cfg.dataset.name, "eval_split": run.cfg.dataset.eval_split, "eval_images": len(everything),
        "calibration": {"images": len(calib), "split": run.cfg.dataset.train_split, "method": "MinMax",
                        "seed": run.cfg.seed},
        "scheme": {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor"},
        "params": int(run.param_count), "metrics": metrics,
        "files": {name: {"path": str(p), "mb": p.stat().st_size / 1e6}
                  for name, p in (("fp32", fp32_path), ("int8", int8_path))},
        "int8_nodes": {"QuantizeLinear": ops.get("QuantizeLinear", 0),
                       "DequantizeLinear": ops.get("DequantizeLinear", 0)},
        "latency_batch1_cpu": latency, "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
        "fp32_parity": parity, "input": meta["input"],
        "wall_s": round(time.perf_counter() - started, 3),
    }
    (out / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(args: Sequence[str]) -> int:
    """``prism quantize checkpoint=RUN_DIR [calibration=N] [step=...] [out=DIR]``."""
    import sys

    from prism.framework.export import ParityError, parse_options

    options = parse_options(args, OPTIONS, "quantize")
    try:
        record = quantize(options)
    except ParityError as exc:
        print(f"prism: error: {exc}", file=sys.stderr)
        return 1
    m, files, lat = record["metrics"], record["files"], record["latency_batch1_cpu"]
    accuracy = (f"accuracy fp32 {m['fp32_accuracy']:.4f} int8 {m['int8_accuracy']:.4f}, "
                if "fp32_accuracy" in m else "")
    print(f"quantize: {accuracy}size {files['fp32']['mb']:.2f} -> {files['int8']['mb']:.2f} MB, CPU batch 1 "
          f"{lat['fp32']['median_ms']:.3f} -> {lat['int8']['median_ms']:.3f} ms (onnxruntime)")
    print(f"wrote {Path(files['int8']['path']).parent / 'quantize.json'}")
    return 0
