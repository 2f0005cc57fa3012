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
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_summary import kernel_times  # noqa: E402  (a sibling script, not a package)

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*"  # name =
                         r"(\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?)\s+"  # result type (a tuple or an array)
                         r"([\w\-]+)\((.*?)\)")  # opcode(operands)
KIND = re.compile(r"kind=(\w+)")
DEDUPLICATED = re.compile(r'deduplicated_name="([^"]+)"')


def shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * BYTES[dtype]
    return total


TOKEN = re.compile(r"\(|\)|\b(?:" + "|".join(BYTES) + r")\[[\d,]*\]")


def parse_type(text: str):
    """An HLO type as nested lists of ``dtype[dims]`` strings: ``(f32[2], (bf16[3], s32[]))``."""
    stack: list[list] = [[]]
    for token in TOKEN.findall(text):
        if token == "(":
            stack.append([])
        elif token == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(token)
    return stack[0][0] if len(stack[0]) == 1 else stack[0]


def operand_bytes(operand: str, types: dict[str, str]) -> int:
    """Bytes of ``name`` or of ``name#i#j`` (element j of element i of a tuple-shaped instruction)."""
    name, *path = operand.split("#")
    node = parse_type(types.get(name, ""))
    for i in path:
        node = node[int(i)]
    return shape_bytes(str(node))


def hlo_fusions(hlo_dir: Path) -> dict[str, tuple[int, int, str, int]]:
    """Kernel name -> (bytes read, bytes written, fusion kind, launches per step) from the optimized HLO text.

    A fusion's operands are looked up by name among the module's instructions (the text prints them without
    shapes). XLA compiles identical fusions once (``deduplicated_name``) and the trace names all their launches
    after one of them, so a kernel's bytes are those of every fusion sharing its ``deduplicated_name``."""
    found: dict[str, tuple[int, int, str, int]] = {}
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
                kind, group = KIND.search(line), DEDUPLICATED.search(line)
                fusions.append((name, result, operands, kind.group(1) if kind else "?",
                                group.group(1) if group else name))
        groups: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
        for _, result, operands, _, group in fusions:
            operands = re.sub(r"/\*.*?\*/", "", operands)  # /*index=5*/ comments
            read = sum(operand_bytes(o.strip().lstrip("%"), types) for o in operands.split(",") if o.strip())
            groups[group].append((read, shape_bytes(result)))
        for name, _, _, kind, group in fusions:
            members = groups[group]
            found[_kernel_name(name)] = (sum(r for r, _ in members), sum(w for _, w in members), kind, len(members))
    return found


def _kernel_name(hlo_name: str) -> str:
    return hlo_name.replace(".", "_").replace("-", "_")


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
        read, written, kind, launches = fusions[name]
        gbs = (read + written) / (ms / 1e3) / 1e9
        fused_ms += ms
        ideal_ms += (read + written) / (peak_gbs * 1e9) * 1e3
        rows.append(f"| `{name}` | {kind} | {launches} | {ms:.3f} | {read / 2**20:.1f} | {written / 2**20:.1f} | "
                    f"{gbs:,.0f} | {gbs / peak_gbs:.0%} |")
    head = [f"{total_ms:.1f} ms of device time per step ({steps} traced steps); fusions found in the HLO: "
            f"{fused_ms:.1f} ms ({fused_ms / total_ms:.0%}), moving their bytes at {peak_gbs:,.0f} GB/s would take "
            f"{ideal_ms:.1f} ms (time-weighted bandwidth {ideal_ms / fused_ms:.0%} of peak); fusion kernels not "
            f"found in the HLO: {unmatched_ms:.1f} ms.", "",
            "| fusion kernel | kind | launches | ms/step | MiB read | MiB written | GB/s | of peak |",
            "|---|---|---|---|---|---|---|---|"]
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
