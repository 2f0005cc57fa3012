"""Where the device time goes: the top kernels of a ``prism bench train --profile DIR`` trace.

    python benchmarks/trace_summary.py DIR [--top 25]

Reads the Perfetto trace (``*.trace.json.gz``) that ``jax.profiler.trace(create_perfetto_trace=True)``
writes, keeps the events of GPU streams, and prints device time per kernel name and per category
(convolution, matmul, fusion, copy/transpose, collective, other), as a share of the traced device time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from pathlib import Path

CATEGORIES = (("convolution", ("conv", "cudnn", "xmma", "implicit_gemm", "dgrad", "wgrad", "fprop")),
              ("matmul", ("gemm", "cublas", "cutlass", "matmul", "triton_gemm", "nvjet")),
              ("collective", ("nccl", "all-reduce", "all_reduce", "reduce-scatter", "all-gather")),
              ("copy/transpose", ("copy", "transpose", "memcpy", "memset")),
              ("fusion", ("fusion", "loop_", "input_", "reduce", "triton")))


def category(name: str) -> str:
    low = name.lower()
    for label, needles in CATEGORIES:
        if any(n in low for n in needles):
            return label
    return "other"


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


def per_device(events: list[dict], names: dict, gpu: set) -> list[str]:
    """Per GPU: the traced span, the time any kernel runs (streams overlapped), collectives alone and the
    compute kernels alone: a device waiting on its peers shows as idle or as collective time not hidden
    behind compute."""
    lines = ["| device | span ms | busy ms | idle | collective ms | compute ms | collective not overlapped ms |",
             "|---|---|---|---|---|---|---|"]
    for pid in sorted(gpu):
        spans = [(e["ts"], e["ts"] + e["dur"], category(e["name"]) == "collective") for e in events
                 if e.get("ph") == "X" and e.get("pid") == pid and "dur" in e]
        if not spans:
            continue
        every = [(a, b) for a, b, _ in spans]
        collective = [(a, b) for a, b, c in spans if c]
        compute = [(a, b) for a, b, c in spans if not c]
        span = (max(b for _, b in every) - min(a for a, _ in every)) / 1e3
        busy = _union_ms(every)
        exposed = busy - _union_ms(compute)
        lines.append(f"| {names[pid][:40]} | {span:.1f} | {busy:.1f} | {1 - busy / span:.1%} | "
                     f"{_union_ms(collective):.1f} | {_union_ms(compute):.1f} | {exposed:.1f} |")
    return lines


def load_trace(directory: Path) -> tuple[str, list[dict], dict, set]:
    """The newest Perfetto trace under ``directory``: (file name, events, process id -> name, device pids)."""
    files = sorted(directory.rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {directory}")
    trace = json.loads(gzip.open(files[-1]).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    return files[-1].name, events, names, gpu


def kernel_times(directory: Path) -> dict[str, float]:
    """Kernel name -> total device microseconds in the newest trace under ``directory``."""
    _, events, _, gpu = load_trace(directory)
    per_kernel: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            per_kernel[e["name"]] += e["dur"]
    return per_kernel


def summarize(directory: Path, top: int = 25) -> str:
    file_name, events, names, gpu = load_trace(directory)
    per_kernel = kernel_times(directory)
    total = sum(per_kernel.values()) or 1.0
    per_cat: dict[str, float] = collections.Counter()
    for name, dur in per_kernel.items():
        per_cat[category(name)] += dur
    lines = [f"trace {file_name}: {total / 1e3:.1f} ms of device time in {len(per_kernel)} kernels",
             "", "| category | ms | share |", "|---|---|---|"]
    lines += [f"| {c} | {d / 1e3:.1f} | {d / total:.1%} |" for c, d in per_cat.most_common()]
    lines += ["", *per_device(events, names, gpu)]
    lines += ["", "| kernel | category | ms | share |", "|---|---|---|---|"]
    lines += [f"| `{n[:90]}` | {category(n)} | {d / 1e3:.2f} | {d / total:.1%} |"
              for n, d in per_kernel.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(summarize(args.directory, args.top))
