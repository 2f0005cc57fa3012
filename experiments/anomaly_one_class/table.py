"""Per-class and mean AUROC of the one-class anomaly runs, beside the published means, from their result.json files.

    python experiments/anomaly_one_class/table.py RECORD_DIR [--write README.md]

RECORD_DIR holds ``<method>/class<K>_seed<S>/result.json`` (and the run's ``config.yaml``), as
``experiments/anomaly_one_class/run.sh`` (Fashion-MNIST) and ``benchmarks/anomaly_cifar10_gpu.sh`` (CIFAR-10)
leave them; methods whose names start with ``cifar10_`` form the CIFAR-10 table. Each cell is the mean over the
seeds found (± the sample standard deviation with more than one); the mean row averages the per-class means.
Nothing is typed by hand but the published means (and their sources) below. ``--write`` replaces the section
between the ``anomaly-table`` markers of the file (appended when absent); without it the table is printed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

BEGIN, END = "<!-- anomaly-table:begin -->", "<!-- anomaly-table:end -->"
CLASSES = {
    "fashion_mnist": ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
#: Mean AUROC (%) over the 10 one-class tasks, as the papers report them.
PUBLISHED = {
    "fashion_mnist": [("GEOM (Golan & El-Yaniv 2018, Table 1)", 93.5)],
    "cifar10": [("Deep SVDD (Ruff et al. 2018, Table 1)", 64.8), ("GEOM (Golan & El-Yaniv 2018)", 86.0),
                ("CSI (Tack et al. 2020)", 94.3)],
}
DESCRIPTIONS = {
    "knn": "kNN (k=2, euclidean) on Gaussian-blurred pixels (sigma=1), nothing learned",
    "svdd": "Deep SVDD, bias-free conv encoder, 5 epochs on class K, no AE pre-training",
    "ae": "conv autoencoder, 5 epochs on class K, mean per-pixel squared error",
    "cifar10_knn_simclr": "kNN (k=2, cosine) on SimCLR ResNet-18 features (pre-trained on the 50k unlabelled "
                          "training images)",
    "cifar10_knn_pixels": "kNN (k=2, euclidean) on Gaussian-blurred pixels (sigma=1), nothing learned",
}


def collect(record: Path) -> dict[str, dict[int, list[float]]]:
    """``{method: {class: [auroc of each seed]}}`` from the completed runs under ``record``."""
    found: dict[str, dict[int, list[float]]] = {}
    for path in sorted(record.glob("*/class*_seed*/result.json")):
        match = re.fullmatch(r"class(\d+)_seed(\d+)", path.parent.name)
        result = json.loads(path.read_text())
        if not match or result.get("status", "completed") != "completed":  # offline evaluations have none
            continue
        found.setdefault(path.parent.parent.name, {}).setdefault(int(match[1]), []).append(
            100 * float(result["metrics"]["eval/auroc"]))
    return found


def cell(values: list[float]) -> str:
    if len(values) > 1:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
    return f"{values[0]:.1f}"


def table(dataset: str, methods: dict[str, dict[int, list[float]]]) -> list[str]:
    names = sorted(methods)
    lines = [f"| normal class | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for k, label in enumerate(CLASSES[dataset]):
        row = [cell(methods[m][k]) if k in methods[m] else "–" for m in names]
        lines.append(f"| {k} {label} | {' | '.join(row)} |")
    means = []
    for m in names:
        per_class = [statistics.mean(v) for v in methods[m].values()]
        seeds = sorted({len(v) for v in methods[m].values()})
        complete = len(per_class) == len(CLASSES[dataset])
        means.append(f"**{statistics.mean(per_class):.1f}**" + ("" if complete else f" ({len(per_class)} classes)")
                     + f" (seeds/class: {'/'.join(map(str, seeds))})")
    lines.append(f"| **mean** | {' | '.join(means)} |")
    lines.append("")
    lines += [f"- `{m}`: {DESCRIPTIONS.get(m, m)}" for m in names]
    lines += [f"- published mean, {source}: **{value}**" for source, value in PUBLISHED[dataset]]
    return lines


def render(record: Path) -> str:
    found = collect(record)
    note = "<!-- written by experiments/anomaly_one_class/table.py from the result.json files; do not edit -->"
    lines = [BEGIN, note, ""]
    for dataset in ("fashion_mnist", "cifar10"):
        methods = {m: v for m, v in found.items() if m.startswith("cifar10_") == (dataset == "cifar10")}
        if methods:
            lines += [f"**{'Fashion-MNIST' if dataset == 'fashion_mnist' else 'CIFAR-10'}**, test AUROC (%):", ""]
            lines += table(dataset, methods) + [""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()
    section = render(args.record)
    if not args.write:
        print(section, end="")
        return
    text = args.write.read_text() if args.write.exists() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text + ("\n" if text else "") + section
    args.write.write_text(text)


if __name__ == "__main__":
    main()
