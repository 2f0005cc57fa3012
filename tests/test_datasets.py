"""Dataset plugins on real data: digits (bundled with scikit-learn) and Fashion-MNIST's idx format."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from framework.errors import ConfigError, DataError
from framework.registry import DATASETS


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_split_is_stratified_and_complete():
    from sklearn.datasets import load_digits

    source = DATASETS.build("digits")
    train, test = source.split("train"), source.split("test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert source.info.num_classes == 10 and source.info.image_shape == (8, 8, 1)
    labels = np.array([test[i]["label"] for i in range(len(test))])
    assert np.all(np.bincount(labels, minlength=10) >= 35)  # ~20% of each class
    example = train[0]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (8, 8, 1)
    # Pixel values are the real digits (0-16) rescaled to 0-255.
    originals = {tuple(np.round(img * 255 / 16).astype(np.uint8).ravel()) for img in load_digits().images}
    assert tuple(example["image"].ravel()) in originals
    with pytest.raises(ConfigError, match="no split 'validation'"):
        source.split("validation")


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
        expected[split] = (images, labels)
    cfg = DATASETS.get("fashion_mnist_local").config(path=str(tmp_path))
    source = DATASETS.build("fashion_mnist_local", cfg)
    assert source.info.splits == {"train": 12, "test": 5}
    ex = source.split("test")[3]
    np.testing.assert_array_equal(ex["image"][..., 0], expected["t10k"][0][3])
    assert ex["label"] == expected["t10k"][1][3]


def test_fashion_mnist_missing_path_names_it(tmp_path):
    cfg = DATASETS.get("fashion_mnist_local").config(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"dataset.path=.*nowhere.*apt-get install -y dataset-fashion-mnist"):
        DATASETS.build("fashion_mnist_local", cfg)


def test_truncated_idx_file_is_reported(tmp_path):
    from plugins.datasets.fashion_mnist_local import read_idx

    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_cli_missing_data_path_is_one_clear_message(tmp_path):
    from conftest import REPO, run_prism

    proc = run_prism("train", "dataset=fashion_mnist_local", f"dataset.path={tmp_path}/absent",
                     f"hydra.run.dir={tmp_path}/run", cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prism: error: dataset.path=" in proc.stderr and "absent" in proc.stderr
    assert "Traceback" not in proc.stderr
