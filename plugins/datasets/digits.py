"""scikit-learn's bundled UCI digits: 1,797 real 8x8 grayscale images, 10 classes, no download.

Prepared once as a TFDS array_record dataset (``<data_dir>/digits/<identity>/``) with a stratified,
seeded train/test split, then read through :class:`~plugins.datasets.tfds_source.TFDSSource`; being
tiny and read for many epochs by the default job, its splits are cached in memory by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS
from prism.plugins.datasets.tfds_source import Plan, TFDSSource, labelled_array_plan, load_or_prepare, short_identity

CLASS_NAMES = tuple(str(d) for d in range(10))
VERSION = "1.0.0"


@dataclass
class DigitsConfig:
    """Digits with a stratified, seeded train/test split.

    test_fraction: share of each class held out as the ``test`` split.
    split_seed: seed of the split (fixed, so every run evaluates on the same images).
    train_split / eval_split: the splits (TFDS specs, slicing allowed) the trainer trains and evaluates on.
    data_dir: where the prepared dataset lives ('' = $PRISM_DATA_DIR or ~/tensorflow_datasets).
    cache: keep the decoded splits in memory (1,797 tiny images; saves decoding every epoch).
    """

    test_fraction: float = field(default=0.2, metadata={"gt": 0, "lt": 1})
    split_seed: int = field(default=0, metadata={"ge": 0})
    train_split: str = "train"
    eval_split: str = "test"
    data_dir: str = ""
    cache: bool = True


def split_digits(test_fraction: float, split_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train"|"test": (uint8 images (N, 8, 8, 1) scaled 0-16 -> 0-255, int32 labels)}``, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_fraction, random_state=split_seed, stratify=labels)
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def digits_plan(test_fraction: float, split_seed: int) -> Plan:
    return labelled_array_plan(
        split_digits(test_fraction, split_seed), image_shape=(8, 8, 1), class_names=CLASS_NAMES,
        description=f"scikit-learn digits, stratified split test_fraction={test_fraction} seed={split_seed}")


@DATASETS.register("digits", config=DigitsConfig,
                   description="scikit-learn's bundled 8x8 digits (1,797 real images, 10 classes).")
def build_digits(cfg: DigitsConfig) -> TFDSSource:
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    identity = short_identity("split", {"test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed})
    builder, _ = load_or_prepare("digits", identity, data_dir=cfg.data_dir, version=VERSION,
                                 make_plan=lambda: digits_plan(cfg.test_fraction, cfg.split_seed))
    meta = builder.info.metadata
    return TFDSSource(builder, dataset="digits", used_splits=(cfg.train_split, cfg.eval_split),
                      mean=meta["mean"], std=meta["std"], cache=cfg.cache)
