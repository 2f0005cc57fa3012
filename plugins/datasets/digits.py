"""scikit-learn's bundled UCI digits: 1,797 real 8x8 grayscale images, 10 classes, no download."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from framework.api import DataInfo
from framework.errors import ConfigError
from framework.registry import DATASETS


@dataclass
class DigitsConfig:
    """Digits with a stratified, seeded train/test split.

    test_fraction: share of each class held out as the ``test`` split.
    split_seed: seed of the split (fixed, so every run evaluates on the same images).
    train_split / eval_split: the splits the trainer trains and evaluates on.
    """

    test_fraction: float = 0.2
    split_seed: int = 0
    train_split: str = "train"
    eval_split: str = "test"


class ArraySplit(Sequence):
    """Random access to in-memory ``image``/``label`` arrays as example dicts."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


class DigitsSource:
    """The digits images as uint8 (0-16 scaled to 0-255), shape (8, 8, 1)."""

    def __init__(self, cfg: DigitsConfig) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0 < cfg.test_fraction < 1:
            raise ConfigError(f"dataset.test_fraction must be in (0, 1), got {cfg.test_fraction}")
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int32)
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=cfg.test_fraction, random_state=cfg.split_seed, stratify=labels)
        self._splits = {"train": ArraySplit(x_train, y_train), "test": ArraySplit(x_test, y_test)}
        self.info = DataInfo(num_classes=10, image_shape=(8, 8, 1),
                             splits={k: len(v) for k, v in self._splits.items()},
                             class_names=tuple(str(d) for d in range(10)),
                             mean=(float(x_train.mean() / 255.0),), std=(float(x_train.std() / 255.0),))

    def split(self, name: str) -> ArraySplit:
        if name not in self._splits:
            raise ConfigError(f"dataset 'digits' has no split {name!r}; splits: {', '.join(self._splits)}")
        return self._splits[name]


@DATASETS.register("digits", config=DigitsConfig,
                   description="scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes).")
def build_digits(cfg: DigitsConfig) -> DigitsSource:
    return DigitsSource(cfg)
