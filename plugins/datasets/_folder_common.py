"""Shared pieces of the folder datasets (image_folder, voc_folder, mask_folder) and their checks.

Private (leading underscore): not imported as a plugin. Folder datasets scan and validate their
source, then write it once as a TFDS array_record dataset whose identity hashes the resolved path,
the files' names, sizes and modification times, and the options that change the written data;
``image_size`` is not among them because images are stored as they are and resized when read.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from prism.framework.errors import ConfigError, DataError
from prism.plugins.datasets._parallel_read import image_mode
from prism.plugins.datasets.tfds_source import short_identity

log = logging.getLogger("prism")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class FolderConfig:
    """Options every folder dataset shares.

    path: the dataset folder (read in place, never copied).
    image_size: [H, W] to resize images to when read (host, PIL bilinear); required when sizes vary.
    channels: 3 (RGB) or 1 (grayscale); images are converted to it when prepared.
    test_fraction: share held out as the ``test`` split when the folder has no split of its own.
    split_seed: seed of that split.
    on_corrupt: 'skip' (log them and go on) or 'fail' on images PIL cannot decode.
    train_split / eval_split: the splits (TFDS specs, slicing allowed) the trainer uses.
    data_dir: where the prepared dataset lives ('' = $PRISM_DATA_DIR or ~/tensorflow_datasets).
    mean / std: per-channel normalization of images in [0, 1] (empty: none).
    cache: decode the used splits once into memory.
    """

    path: str = ""
    image_size: list[int] = field(default_factory=list, metadata={"ge": 1})
    channels: int = field(default=3, metadata={"choices": (1, 3)})
    test_fraction: float = field(default=0.2, metadata={"ge": 0, "lt": 1})
    split_seed: int = field(default=0, metadata={"ge": 0})
    on_corrupt: str = field(default="skip", metadata={"choices": ("skip", "fail")})
    train_split: str = "train"
    eval_split: str = "test"
    data_dir: str = ""
    mean: list[float] = field(default_factory=list, metadata={"finite": True})
    std: list[float] = field(default_factory=list, metadata={"gt": 0})
    cache: bool = False


def check_folder_config(cfg: FolderConfig, dataset: str) -> Path:
    """Validate the shared options; returns the resolved ``path``."""
    if not cfg.path:
        raise ConfigError(f"dataset {dataset!r} needs dataset.path (the folder to read)")
    if cfg.channels not in (1, 3):
        raise ConfigError(f"dataset.channels must be 1 or 3, got {cfg.channels}")
    if not 0 <= cfg.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in [0, 1), got {cfg.test_fraction}")
    if cfg.on_corrupt not in ("skip", "fail"):
        raise ConfigError(f"dataset.on_corrupt must be 'skip' or 'fail', got {cfg.on_corrupt!r}")
    return require_dir(Path(cfg.path).expanduser(), "dataset.path").resolve()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}={str(path)!r}: no such directory")
    return path


def natural_key(path: Path | str) -> tuple:
    """Sort key putting ``2.png`` before ``10.png``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path)))


def image_paths(folder: str) -> list[str]:
    """Image files under ``folder`` as strings, unordered (os.scandir: pathlib costs ~35 us a file, 2 s for
    CIFAR-10; the run-time fingerprint of a folder needs no Path objects)."""
    found, pending = [], [folder]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    pending.append(entry.path)
                elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    found.append(entry.path)
    return found


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (any depth, hidden ones skipped), in natural order."""
    return [Path(p) for p in sorted(image_paths(str(folder)), key=natural_key)]


def fingerprint(root: Path, files: Iterable[Path | str]) -> str:
    """A hash of the files' paths (relative to ``root``), sizes and modification times."""
    prefix = str(root) + os.sep
    relative = [(str(f)[len(prefix):] if str(f).startswith(prefix) else str(Path(f).relative_to(root)), str(f))
                for f in files]
    relative.sort(key=lambda pair: pair[0].split(os.sep))  # the order of the Path objects it was written for
    digest = hashlib.sha1()
    for rel, path in relative:
        st = os.stat(path)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def folder_identity(root: Path, files: Iterable[Path | str], options: Mapping[str, Any]) -> str:
    """The TFDS config name of a folder dataset: folder name plus a hash of path, files and options."""
    return short_identity(root.name, {"path": str(root), "files": fingerprint(root, files), **options})


def decode_image(path: Path, channels: int) -> np.ndarray:
    """The pixels prism stores for ``path``: PIL's decoding converted to L or RGB, as (H, W, C) uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert(image_mode(channels)), dtype=np.uint8).reshape(im.height, im.width, channels)


class CorruptImages:
    """Collects the images PIL cannot decode: raises at once (``fail``) or skips and reports them (``skip``)."""

    def __init__(self, policy: str, dataset: str) -> None:
        self.policy, self.dataset, self.paths = policy, dataset, []

    def handle(self, path: Path, error: BaseException) -> None:
        if self.policy == "fail":
            raise DataError(f"dataset {self.dataset!r}: corrupt image {path} ({type(error).__name__}: {error}); "
                            f"remove it or set dataset.on_corrupt=skip")
        self.paths.append(str(path))

    def report(self) -> None:
        if self.paths:
            log.warning("dataset %s: skipped %d corrupt images: %s", self.dataset, len(self.paths),
                        ", ".join(self.paths))


def stratified_test_mask(labels: Sequence[int], test_fraction: float, seed: int) -> np.ndarray:
    """True for the examples held out as test: ``round(n_c * test_fraction)`` random ones of each class c."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[: int(round(len(members) * test_fraction))]] = True
    return test


def random_test_mask(n: int, *, test_fraction: float, test_count: int, seed: int) -> np.ndarray:
    """True for ``test_count`` (or ``round(n * test_fraction)``) examples drawn at random with ``seed``."""
    count = test_count if test_count > 0 else int(round(n * test_fraction))
    if count >= n and n:
        raise ConfigError(f"holding out {count} of {n} examples leaves none to train on; lower dataset.test_count "
                          f"or dataset.test_fraction")
    test = np.zeros(n, dtype=bool)
    test[np.random.default_rng(seed).permutation(n)[:count]] = True
    return test
