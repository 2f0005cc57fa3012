"""Markdown table of a ``benchmarks/run_gpu.sh`` output directory: every figure as a ratio to torch.compile.

    python benchmarks/results_table.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMPLS = ("torch_eager", "torch_compile", "prism")


def table(directory: Path) -> str:
    rows = ["| model | implementation | img/s | ms/step (median) | vs torch.compile | peak memory | MFU "
            "| compile / first step |",
            "|---|---|---|---|---|---|---|---|"]
    models = sorted({p.stem.rsplit("-", 1)[0] for p in directory.glob("*-*.json")})
    for model in models:
        results = {impl: json.loads(p.read_text()) for impl in IMPLS
                   if (p := directory / f"{model}-{impl}.json").exists()}
        base = results.get("torch_compile", {}).get("img_s")
        for impl, r in results.items():
            ratio = f"{r['img_s'] / base:.2f}x" if base else "n/a"
            mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if r.get("peak_memory_bytes") else "n/a"
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") else ""
            first = r.get("compile_s", r.get("first_step_s"))
            rows.append(f"| {model} | {impl} | {r['img_s']:,.0f} | {r['step_ms_median']:.1f} | {ratio} | {mem} | "
                        f"{mfu} | {first:.0f} s |")
    gpu = directory / "gpu.txt"
    head = f"GPU: {gpu.read_text().strip()}\n\n" if gpu.exists() else ""
    return head + "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
