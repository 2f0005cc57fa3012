"""Fashion-MNIST from its original idx ``.gz`` files on local disk (60k train / 10k test, 28x28).

Debian's package ``dataset-fashion-mnist`` installs them under ``/usr/share/datasets/fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``); point ``dataset.path`` elsewhere for another copy.
The first use prepares a TFDS array_record dataset from them (``<data_dir>/fashion_mnist_local/``,
a minute at most), read by index afterwards.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prism.framework.errors import DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._folder_common import fingerprint
from prism.plugins.datasets.tfds_source import Plan, TFDSSource, labelled_array_plan, load_or_prepare, short_identity

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
VERSION = "1.0.0"


@dataclass
class FashionMNISTConfig:
    """path: folder holding the four idx .gz files; train_split / eval_split: splits (TFDS specs) used
    by the trainer; data_dir: where the prepared dataset lives ('' = $PRISM_DATA_DIR or ~/tensorflow_datasets);
    cache: keep the decoded splits in memory."""

    path: str = "/usr/share/datasets/fashion-mnist"
    train_split: str = "train"
    eval_split: str = "test"
    data_dir: str = ""
    cache: bool = False


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


def fashion_mnist_plan(root: Path) -> Plan:
    arrays = {}
    for split, (images, labels) in FILES.items():
        x, y = read_idx(root / images), read_idx(root / labels)
        if len(x) != len(y):
            raise DataError(f"{root / images}: {len(x)} images but {len(y)} labels")
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{root / images}: expected 28x28 images, got shape {x.shape}")
        if y.size and y.max() >= len(CLASS_NAMES):
            raise DataError(f"{root / labels}: label {int(y.max())} out of range (10 classes)")
        arrays[split] = (x, y)
    # The train split's mean/std are recorded (the full set gives the usual 0.2860 / 0.3530).
    return labelled_array_plan(arrays, image_shape=(28, 28, 1), class_names=CLASS_NAMES,
                               description=f"Fashion-MNIST from the idx files in {root}")


@DATASETS.register("fashion_mnist_local", config=FashionMNISTConfig,
                   description="Fashion-MNIST from local idx .gz files (Debian's dataset-fashion-mnist).")
def build_fashion_mnist(cfg: FashionMNISTConfig) -> TFDSSource:
    root = Path(cfg.path).expanduser().absolute()
    files = [root / f for pair in FILES.values() for f in pair]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(
            f"dataset.path={cfg.path!r}: missing Fashion-MNIST file(s) {', '.join(missing)}. Install "
            f"them with `apt-get install -y dataset-fashion-mnist` or set dataset.path to their folder."
        )
    identity = short_identity(root.name, {"path": str(root), "files": fingerprint(root, files)})
    builder, _ = load_or_prepare("fashion_mnist_local", identity, data_dir=cfg.data_dir, version=VERSION,
                                 make_plan=lambda: fashion_mnist_plan(root))
    meta = builder.info.metadata
    return TFDSSource(builder, dataset="fashion_mnist_local", used_splits=(cfg.train_split, cfg.eval_split),
                      mean=meta["mean"], std=meta["std"], cache=cfg.cache)
