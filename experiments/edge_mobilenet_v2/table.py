"""Fill experiments/edge_mobilenet_v2/README.md's table from a trained MobileNetV2 CIFAR-10 run.

    PRISM_CIFAR10=/path/to/cifar10 python experiments/edge_mobilenet_v2/table.py RUN_DIR [--calibration 512]

Runs ``prism export format=onnx`` (fp32, dynamic batch, parity gate against JAX) and ``prism quantize`` (static int8,
QDQ, per-channel weights, calibration on training images; accuracy of JAX, fp32 and int8 ONNX on the whole test
split; CPU latency at batch 1) on the run, copies the run's ``result.json`` and the two reports here
(``run_result.json``, ``export.json``, ``quantize.json``) and rewrites the table between the README's markers. The
pruned rows come from the pruning work (``prune.json`` here, when present, with the same keys as quantize.json's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
START, END = "<!-- table:start -->", "<!-- table:end -->"


def prism(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "prism.framework", *args], text=True, capture_output=True)
    print(proc.stdout.strip())
    if proc.returncode:
        sys.exit(f"prism {args[0]} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")


def table(export: dict, quant: dict, pruned: dict | None) -> str:
    m, lat, files = quant["metrics"], quant["latency_batch1_cpu"], quant["files"]
    params = f"{quant['params'] / 1e6:.2f} M"
    rows = [
        ("fp32 (ONNX)", m["fp32_accuracy"], params, files["fp32"]["mb"], lat["fp32"]["median_ms"],
         lat["jax"]["median_ms"]),
        ("int8 (ONNX, static QDQ)", m["int8_accuracy"], params, files["int8"]["mb"], lat["int8"]["median_ms"], None),
    ]
    for key, label in (("pruned", "pruned"), ("pruned_int8", "pruned + int8")):
        r = (pruned or {}).get(key)
        rows.append((label, *(r[k] for k in ("accuracy", "params", "mb", "onnxruntime_ms", "jax_ms")))
                    if r else (label, None, "–", None, None, None))
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    lines = ["| model | top-1 (CIFAR-10 test) | parameters | file (MB) | CPU batch 1, onnxruntime (ms) | "
             "CPU batch 1, JAX (ms) |", "|---|---|---|---|---|---|"]
    for name, acc, p, mb, ort_ms, jax_ms in rows:
        lines.append(f"| {name} | {fmt(acc, '.2%')} | {p} | {fmt(mb, '.2f')} | {fmt(ort_ms, '.2f')} | "
                     f"{fmt(jax_ms, '.2f')} |")
    fp32, int8 = lat["fp32"]["median_ms"], lat["int8"]["median_ms"]
    parity = export["parity"]
    versions = quant.get("versions", {})
    lines += ["", f"int8 vs fp32: {m['int8_minus_fp32_points']:+.2f} points, "
              f"{files['fp32']['mb'] / files['int8']['mb']:.1f}x smaller, {fp32 / int8:.2f}x the speed on the CPU "
              f"(onnxruntime {versions.get('onnxruntime', '')}). Parity of the fp32 export: max |logit diff| "
              f"{max(o['max_abs_diff'] for o in parity['outputs']):.2g} over {parity['images']} test images, top-1 "
              f"agreement {parity['outputs'][0]['top1_agreement']:.0%}. Latency: median of {lat['fp32']['iters']} "
              f"calls on {quant.get('cpus')} cores, 1-min load average {quant.get('load_average_1min', 0):.1f} "
              f"when measured."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--skip-run", action="store_true", help="only rewrite the table from the JSON files here")
    args = parser.parse_args()
    if not args.skip_run:
        prism("export", f"checkpoint={args.run}", "format=onnx", f"out={args.run}/export/onnx-edge/model.onnx")
        prism("quantize", f"checkpoint={args.run}", f"calibration={args.calibration}", f"out={args.run}/quantize")
        shutil.copy(args.run / "export" / "onnx-edge" / "export.json", HERE / "export.json")
        shutil.copy(args.run / "quantize" / "quantize.json", HERE / "quantize.json")
        shutil.copy(args.run / "result.json", HERE / "run_result.json")
    export = json.loads((HERE / "export.json").read_text())
    quant = json.loads((HERE / "quantize.json").read_text())
    quant.setdefault("versions", export.get("versions", {}))
    pruned = json.loads((HERE / "prune.json").read_text()) if (HERE / "prune.json").is_file() else None
    text = README.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{table(export, quant, pruned)}\n{END}{tail}")
    print(f"wrote {README}")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
