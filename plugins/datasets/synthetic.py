"""Synthetic images for benchmarks and smoke tests: ``dataset=synthetic`` (no files, no preparation).

Example ``i`` of a split is a deterministic function of (split, i): uniform random uint8 pixels and a
random label, generated on access. Nothing here is learnable; the point is measuring steps per second
at any resolution and class count (``prism bench train`` uses it by default) without a dataset on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS

SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclass
class SyntheticConfig:
    """image_size: height = width of the images; channels: 1 or 3; num_classes: label range;
    train_size / test_size: examples per split; train_split / eval_split: the splits used."""

    image_size: int = field(default=224, metadata={"ge": 1})
    channels: int = field(default=3, metadata={"choices": (1, 3)})
    num_classes: int = field(default=1000, metadata={"ge": 1})
    train_size: int = field(default=10_000, metadata={"ge": 1})
    test_size: int = field(default=1_000, metadata={"ge": 1})
    train_split: str = "train"
    eval_split: str = "test"


class SyntheticSplit(Sequence):
    """A random-access split whose examples are generated from their index."""

    def __init__(self, size: int, shape: tuple[int, int, int], num_classes: int, seed: int) -> None:
        self.size, self.shape, self.num_classes, self.seed = size, shape, num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Mapping[str, np.ndarray]:
        if not -self.size <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, index % self.size))
        return {"image": rng.integers(0, 256, self.shape, dtype=np.uint8),
                "label": np.int32(rng.integers(self.num_classes))}


class SyntheticSource:
    def __init__(self, cfg: SyntheticConfig) -> None:
        shape = (cfg.image_size, cfg.image_size, cfg.channels)
        self.sizes = {"train": cfg.train_size, "test": cfg.test_size}
        self.info = DataInfo(num_classes=cfg.num_classes, image_shape=shape, splits=dict(self.sizes),
                             mean=(0.5,) * cfg.channels, std=(0.29,) * cfg.channels)
        self._splits = {name: SyntheticSplit(size, shape, cfg.num_classes, SPLIT_SEEDS[name])
                        for name, size in self.sizes.items()}

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]:
        if name not in self._splits:
            raise ConfigError(f"dataset 'synthetic' has splits {sorted(self._splits)}, not {name!r}")
        return self._splits[name]


@DATASETS.register("synthetic", config=SyntheticConfig,
                   description="Random uint8 images and labels generated on access (benchmarks, smoke tests).")
def build_synthetic(cfg: SyntheticConfig) -> SyntheticSource:
    if cfg.image_size < 1 or cfg.channels not in (1, 3) or cfg.num_classes < 1:
        raise ConfigError(f"dataset 'synthetic' needs image_size >= 1, channels 1 or 3 and num_classes >= 1; "
                          f"got {cfg.image_size}, {cfg.channels}, {cfg.num_classes}")
    if cfg.train_size < 1 or cfg.test_size < 1:
        raise ConfigError(f"dataset 'synthetic' needs train_size and test_size >= 1, got {cfg.train_size}, "
                          f"{cfg.test_size}")
    return SyntheticSource(cfg)
