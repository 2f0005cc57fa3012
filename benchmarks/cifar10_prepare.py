"""Turn the CIFAR-10 JPEG folders into airbench's ``cifar10/train.pt`` and ``cifar10/test.pt``.

    python benchmarks/cifar10_prepare.py SRC OUT_DIR [--workers N] [--seed 0] [--format pt|npz] [--report FILE]

SRC holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (the copy in ``shared/data/cifar10_jpeg``:
50,000 + 10,000 32x32 JPEGs). Writes what airbench 0.1.8's ``CifarLoader`` reads (``utils.py``: it
``torch.load``s ``<path>/train.pt``/``test.pt``, else builds them from ``torchvision.datasets.CIFAR10``):
a dict ``{'images': uint8 tensor (N, 32, 32, 3) NHWC, 'labels': int64 tensor (N,), 'classes': list[str]}``,
i.e. ``torch.tensor(dset.data)``, ``torch.tensor(dset.targets)`` and ``dset.classes``. Labels index
``classes``; for CIFAR-10's ten folder names that is torchvision's order (airplane, automobile, bird, cat,
deer, dog, frog, horse, ship, truck, which is also the sorted order), for other folders the sorted names.

Pixels are PIL's decoding converted to RGB, as prism's ``image_folder`` reads them. The training split is
put in a random order (``--seed``, default 0; ``--seed -1`` keeps folder order): the original CIFAR-10 files
are in random order and airbench whitens its first layer from ``train_images[:5000]``, which in class-folder
order would be airplanes and half the automobiles only. The test split keeps folder order (class, then file
name). ``--format npz`` writes ``train.npz``/``test.npz`` with the same arrays instead (no torch needed; used
by the CPU tests). ``--report`` writes counts and timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

#: torchvision.datasets.CIFAR10(...).classes, in its label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def class_names(folder: Path) -> list[str]:
    """The class folders of ``folder``: CIFAR-10's label order for its ten names, else sorted."""
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise SystemExit(f"{folder}: no class sub-folders")
    return list(CIFAR10_CLASSES) if set(names) == set(CIFAR10_CLASSES) else names


def list_split(folder: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """Every image under ``folder/<class>/`` (classes in ``classes`` order, files sorted by name) and its label."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SystemExit(f"{folder / name}: no images")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def decode(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of ``path``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode_all(paths: list[Path], workers: int) -> np.ndarray:
    """The images of ``paths`` stacked as (N, H, W, 3) uint8 (``workers`` processes; 0 or 1: this one)."""
    if workers > 1 and len(paths) > 1000:
        with Pool(workers) as pool:
            images = pool.map(decode, paths, chunksize=max(64, len(paths) // (workers * 8)))
    else:
        images = [decode(p) for p in paths]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise SystemExit(f"images differ in size ({sorted(shapes)[:4]}...): airbench needs one size")
    return np.stack(images)


def load_split(folder: Path, classes: list[str], *, workers: int = 0,
               seed: int | None = None) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """``(images (N, H, W, 3) uint8, labels (N,) int64, paths)`` of one split; shuffled when ``seed`` is set."""
    paths, labels = list_split(folder, classes)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(paths))
        paths, labels = [paths[i] for i in order], labels[order]
    return decode_all(paths, workers), labels, paths


def save(out: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str], fmt: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        path = out / f"{split}.npz"
        np.savez(path, images=images, labels=labels, classes=np.asarray(classes))
        return path
    import torch

    path = out / f"{split}.pt"
    torch.save({"images": torch.from_numpy(np.ascontiguousarray(images)), "labels": torch.from_numpy(labels),
                "classes": list(classes)}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="folder with train/<class>/*.jpg and test/<class>/*.jpg")
    parser.add_argument("out", type=Path, help="where train.pt and test.pt go (airbench's 'cifar10' folder)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0, help="training-split order (-1: folder order)")
    parser.add_argument("--format", choices=("pt", "npz"), default="pt")
    parser.add_argument("--report", type=Path, default=None)
    args = parser.parse_args(argv)
    classes = class_names(args.src / "train")
    report: dict = {"src": str(args.src), "out": str(args.out), "classes": classes, "workers": args.workers,
                    "train_order": f"shuffled, seed {args.seed}" if args.seed >= 0 else "folder order",
                    "test_order": "folder order"}
    started = time.perf_counter()
    for split in ("train", "test"):
        t0 = time.perf_counter()
        images, labels, _ = load_split(args.src / split, classes, workers=args.workers,
                                       seed=args.seed if split == "train" and args.seed >= 0 else None)
        decoded = time.perf_counter() - t0
        path = save(args.out, split, images, labels, classes, args.format)
        report[split] = {"count": int(len(labels)), "shape": list(images.shape), "path": str(path),
                         "per_class": np.bincount(labels, minlength=len(classes)).tolist(),
                         "decode_s": round(decoded, 3), "save_s": round(time.perf_counter() - t0 - decoded, 3)}
        print(f"{split}: {len(labels)} images {images.shape[1:]} -> {path} (decode {decoded:.1f} s)", flush=True)
    report["total_s"] = round(time.perf_counter() - started, 3)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
