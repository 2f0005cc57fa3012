"""``digits_text``: scikit-learn's 8x8 digits as one-character text lines, for the OCR plugins.

The same images and stratified, seeded split as ``digits``; each image's label ``d`` becomes the text ``"d"``
over the alphabet ``0123456789`` (text-line examples: ``image``, ``text``, ``text_length``; see
``_text_common``), so ``crnn`` + ``ctc`` + ``text_recognition`` can be checked on real, tiny data. Held in
memory (1,797 images).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._text_common import ArraySplit, image_statistics, text_info
from prism.plugins.datasets.digits import split_digits

ALPHABET = "0123456789"


@dataclass
class DigitsTextConfig:
    """test_fraction / split_seed: as ``digits`` (the same split for the same values)."""

    test_fraction: float = field(default=0.2, metadata={"gt": 0, "lt": 1})
    split_seed: int = field(default=0, metadata={"ge": 0})
    train_split: str = "train"
    eval_split: str = "test"


class DigitsTextSource:
    def __init__(self, cfg: DigitsTextConfig) -> None:
        self._splits = {}
        for name, (images, labels) in split_digits(cfg.test_fraction, cfg.split_seed).items():
            text = (labels.astype(np.int32) + 1)[:, None]  # digit d is the alphabet's character d: code d + 1
            self._splits[name] = ArraySplit({"image": images, "text": text,
                                             "text_length": np.ones(len(labels), np.int32)})
        mean, std = image_statistics(self._splits["train"].arrays["image"])
        self.info = text_info(ALPHABET, (8, 8, 1), {k: len(v) for k, v in self._splits.items()}, mean=mean, std=std)

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]:
        if name not in self._splits:
            raise ConfigError(f"dataset 'digits_text' has splits {sorted(self._splits)}, not {name!r}")
        return self._splits[name]


@DATASETS.register("digits_text", config=DigitsTextConfig,
                   description="scikit-learn's 8x8 digits as one-character text lines (OCR plugins).")
def build_digits_text(cfg: DigitsTextConfig) -> DigitsTextSource:
    if not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1), got {cfg.test_fraction}")
    return DigitsTextSource(cfg)
