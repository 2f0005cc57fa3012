"""How close XLA's memory-bound kernels run to the GPU's memory bandwidth, from a profile and the HLO.

    python benchmarks/fusion_bandwidth.py PROFILE_DIR HLO_DIR [--steps 5] [--peak-gbs 3350] [--top 30]

PROFILE_DIR: a ``prism bench train --profile`` trace; HLO_DIR: the same program dumped by XLA
(``XLA_FLAGS=--xla_dump_to=HLO_DIR --xla_dump_hlo_as_text``; ``benchmarks/resnet50_ab.sh`` with ``PROFILE=1``
writes both). For every fusion kernel of the trace, the bytes it moves are taken from its HLO instruction
(the sizes of its operands and results: an estimate, exact for elementwise and reduction fusions that read
each operand once) and divided by its device time. The summary says how much of the step the fusions take and
how long they would take at ``--peak-gbs`` (H100 SXM HBM3: 3,350 GB/s): the most that faster kernels for the
same fusions could save. Saving more needs fewer bytes moved (fewer or smaller passes), not faster kernels.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*"  # name =
                         r"(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"  # result type (a tuple or an array)
                         r"([\w\-]+)\((.*?)\)")  # opcode(operands)
KIND = re.compile(r"kind=(\w+)")


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * BYTES[dtype]
    return total


def hlo_fusions(hlo_dir: Path) -> dict[str, tuple[int, int, str]]:
    """Kernel name -> (bytes read, bytes written, fusion kind) from the optimized HLO text dumps: a fusion's
    operands are looked up by name among the module's instructions (the text prints them without shapes)."""
    found: dict[str, tuple[int, int, str]] = {}
    for path in sorted(hlo_dir.glob("*after_optimizations.txt")):
        types: dict[str, str] = {}
        fusions = []
        for line in path.read_text().splitlines():
            m = INSTRUCTION.match(line)
            if not m:
                continue
            name, result, opcode, operands = m.groups()
            types[name] = result
            if opcode == "fusion":
                kind = KIND.search(line)
                fusions.append((name, result, operands, kind.group(1) if kind else "?"))
        for name, result, operands, kind in fusions:
            names = [o.strip().lstrip("%") for o in operands.split(",") if o.strip()]
            read = sum(shape_bytes(types.get(o, "")) for o in names)
            found[name.replace(".", "_").replace("-", "_")] = (read, shape_bytes(result), kind)
    return found


def kernel_times(profile_dir: Path) -> dict[str, float]:
    """Kernel name -> total device microseconds in the trace."""
    files = sorted(profile_dir.rglob("*.trace.json.gz"))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {profile_dir}")
    trace = json.loads(gzip.open(files[-1]).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, n in names.items() if "gpu" in n.lower() or "/device:" in n.lower()}
    times: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            times[e["name"]] += e["dur"]
    return times


def report(profile_dir: Path, hlo_dir: Path, steps: int, peak_gbs: float, top: int) -> str:
    fusions, times = hlo_fusions(hlo_dir), kernel_times(profile_dir)
    total_ms = sum(times.values()) / 1e3 / steps
    rows, fused_ms, ideal_ms, unmatched_ms = [], 0.0, 0.0, 0.0
    for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
        ms = us / 1e3 / steps
        if name not in fusions:
            if "fusion" in name:
                unmatched_ms += ms
            continue
        read, written, kind = fusions[name]
        gbs = (read + written) / (ms / 1e3) / 1e9
        fused_ms += ms
        ideal_ms += (read + written) / (peak_gbs * 1e9) * 1e3
        rows.append(f"| `{name}` | {kind} | {ms:.3f} | {read / 2**20:.1f} | {written / 2**20:.1f} | {gbs:,.0f} | "
                    f"{gbs / peak_gbs:.0%} |")
    head = [f"{total_ms:.1f} ms of device time per step ({steps} traced steps); fusions found in the HLO: "
            f"{fused_ms:.1f} ms ({fused_ms / total_ms:.0%}), moving their bytes at {peak_gbs:,.0f} GB/s would take "
            f"{ideal_ms:.1f} ms (time-weighted bandwidth {ideal_ms / fused_ms:.0%} of peak); fusion kernels not "
            f"found in the HLO: {unmatched_ms:.1f} ms.", "",
            "| fusion | kind | ms/step | MiB read | MiB written | GB/s | of peak |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows[:top])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile_dir", type=Path)
    parser.add_argument("hlo_dir", type=Path)
    parser.add_argument("--steps", type=int, default=5, help="steps in the trace (bench train traces 5)")
    parser.add_argument("--peak-gbs", type=float, default=3350.0)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    print(report(args.profile_dir, args.hlo_dir, args.steps, args.peak_gbs, args.top))


if __name__ == "__main__":
    main()
