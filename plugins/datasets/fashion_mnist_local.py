"""Fashion-MNIST from its original idx ``.gz`` files on local disk (60k train / 10k test, 28x28).

Debian's package ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``); point ``dataset.path`` elsewhere for another copy.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from framework.api import DataInfo
from framework.errors import ConfigError, DataError
from framework.registry import DATASETS
from plugins.datasets.digits import ArraySplit

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass
class FashionMNISTConfig:
    """path: folder holding the four idx .gz files; train_split / eval_split: splits used by the trainer."""

    path: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = "train"
    eval_split: str = "test"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims, big-endian uint8 payload) as a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not a uint8 idx file (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {payload.size} values")
    return payload.reshape(shape)


class FashionMNISTSource:
    def __init__(self, cfg: FashionMNISTConfig) -> None:
        root = Path(cfg.path)
        missing = [str(root / f) for pair in FILES.values() for f in pair if not (root / f).is_file()]
        if missing:
            raise DataError(
                f"dataset.path={cfg.path!r}: missing Fashion-MNIST file(s) {', '.join(missing)}. Install "
                f"them with `apt-get install -y dataset-fashion-mnist` or set dataset.path to their folder."
            )
        self._splits = {}
        for split, (images, labels) in FILES.items():
            x, y = read_idx(root / images), read_idx(root / labels).astype(np.int32)
            if len(x) != len(y):
                raise DataError(f"{root / images}: {len(x)} images but {len(y)} labels")
            self._splits[split] = ArraySplit(x[..., None], y)
        self.info = DataInfo(num_classes=10, image_shape=(28, 28, 1),
                             splits={k: len(v) for k, v in self._splits.items()}, class_names=CLASS_NAMES,
                             mean=(0.2860,), std=(0.3530,))

    def split(self, name: str) -> ArraySplit:
        if name not in self._splits:
            raise ConfigError(f"dataset 'fashion_mnist_local' has no split {name!r}; splits: train, test")
        return self._splits[name]


@DATASETS.register("fashion_mnist_local", config=FashionMNISTConfig,
                   description="Fashion-MNIST from local idx .gz files (Debian's dataset-fashion-mnist).")
def build_fashion_mnist(cfg: FashionMNISTConfig) -> FashionMNISTSource:
    return FashionMNISTSource(cfg)
