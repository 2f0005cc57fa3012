"""Tabulate experiments/explain: the deletion/insertion AUCs of every ``faith/RUN-METHOD.json`` (what ``prism eval``
printed), the runs' test accuracy, and montages of the overlays ``prism explain`` wrote.

    python experiments/explain/report.py WORK_DIR experiments/explain
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

ORDER = ["resnet18-gradcam", "resnet18-gradcam_pp", "resnet18-ig", "resnet18-smoothgrad", "vit-rollout",
         "vit-gradcam", "vit-ig"]


def montage(folders: list[Path], out: Path, scale: float = 0.5) -> None:
    """One row per folder of overlay PNGs (sorted by name), each cell scaled by ``scale``, 256-colour PNG."""
    rows = [[Image.open(p).convert("RGB") for p in sorted(f.glob("*.png"))] for f in folders]
    cell_w, cell_h = (int(rows[0][0].width * scale), int(rows[0][0].height * scale))
    canvas = Image.new("RGB", (cell_w * max(len(r) for r in rows), cell_h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            canvas.paste(im.resize((cell_w, cell_h), Image.Resampling.LANCZOS), (x * cell_w, y * cell_h))
    canvas.quantize(256).save(out, optimize=True)


def main(work: Path, here: Path) -> None:
    rows, record = [], {}
    for name in ORDER:
        path = work / "faith" / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        m = {k.removeprefix("eval/"): v for k, v in result["metrics"].items()}
        run, method = name.split("-", 1)
        accuracy = json.loads((work / "runs" / run / "result.json").read_text())["metrics"]["eval/accuracy"]
        record[name] = {"run": run, "method": method, "test_accuracy": accuracy, **m}
        rows.append(f"| {run} | {method} | {m['deletion_auc']:.3f} | {m['random_deletion_auc']:.3f} | "
                    f"{m['deletion_beats_random']:.0%} | {m['insertion_auc']:.3f} | {m['random_insertion_auc']:.3f} | "
                    f"{m['insertion_beats_random']:.0%} |")
    header = ["| model | method | deletion AUC (lower is better) | random | images beating random | "
              "insertion AUC (higher is better) | random | images beating random |",
              "|---|---|---|---|---|---|---|---|"]
    (here / "results.md").write_text("\n".join(header + rows) + "\n")
    (here / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    for run, methods in (("resnet18", ["gradcam", "ig"]), ("vit", ["rollout", "gradcam"])):
        folders = [work / "explain" / f"{run}-{m}" for m in methods]
        if all(f.is_dir() for f in folders):
            montage(folders, here / f"overlays_{run}.png")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
