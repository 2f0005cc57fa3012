"""Shared pieces of the text-line datasets (rendered_text, text_folder, digits_text).

Private (leading underscore): not imported as a plugin. A text-line example is
``{"image": uint8 (H, W, C), "text": int32 (max_length,), "text_length": int32 ()}``: ``text`` holds the
line's characters as codes ``1..len(alphabet)`` (the character's position in the alphabet plus one), padded
with 0 after ``text_length``. Code 0 is CTC's blank; ``DataInfo.class_names`` is ``("<blank>", *alphabet)`` and
``num_classes`` its length, so a task or objective reads the alphabet from the dataset's metadata alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError, DataError

#: The default alphabet of the text datasets: digits and lowercase ASCII letters.
DEFAULT_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
#: ``class_names[0]``: the name of CTC's blank class (code 0).
BLANK_NAME = "<blank>"

Example = dict[str, np.ndarray]


def check_alphabet(alphabet: str) -> str:
    """``alphabet`` if it is usable: non-empty, every character once; else a one-line ConfigError."""
    if not alphabet:
        raise ConfigError("dataset.alphabet is empty: give the characters the text may hold, e.g. "
                          "\"dataset.alphabet='0123456789'\" (quoted, so Hydra keeps it a string)")
    repeated = sorted({c for c in alphabet if alphabet.count(c) > 1})
    if repeated:
        raise ConfigError(f"dataset.alphabet lists {''.join(repeated)!r} more than once; give each character once")
    return alphabet


def text_info(alphabet: str, image_shape: tuple[int, int, int], splits: Mapping[str, int],
              mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> DataInfo:
    """The DataInfo of a text-line dataset: classes are the blank plus the alphabet's characters."""
    return DataInfo(num_classes=len(alphabet) + 1, image_shape=image_shape, splits=dict(splits),
                    class_names=(BLANK_NAME, *alphabet), mean=mean, std=std)


def encode(text: str, alphabet: str, max_length: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes int32 (max_length,) padded with 0, length int32)`` of ``text``; ``where`` (``file:line``) names the
    source in the DataError for a character outside the alphabet or a line longer than ``max_length``."""
    unknown = sorted({c for c in text if c not in alphabet})
    if unknown:
        raise DataError(f"{where}: text {text!r} has character(s) {''.join(unknown)!r} not in dataset.alphabet "
                        f"{alphabet!r} (add them to dataset.alphabet, or fix the label)")
    if len(text) > max_length:
        raise DataError(f"{where}: text {text!r} has {len(text)} characters, more than dataset.max_length="
                        f"{max_length}")
    codes = np.zeros(max_length, np.int32)
    codes[:len(text)] = [alphabet.index(c) + 1 for c in text]
    return codes, np.int32(len(text))


def decode_codes(codes: Sequence[int], class_names: Sequence[str]) -> str:
    """The string of class codes ``codes`` (0, the blank, and out-of-range codes are dropped)."""
    return "".join(class_names[c] for c in codes if 0 < c < len(class_names))


def image_statistics(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``images`` (N, H, W, C) in [0, 1]."""
    scaled = images.astype(np.float64) / 255.0
    return (tuple(float(m) for m in scaled.mean(axis=(0, 1, 2))),
            tuple(max(float(s), 1e-3) for s in scaled.std(axis=(0, 1, 2))))


class ArraySplit(Sequence):
    """A split held as one array per key (random access by index; ``stacked`` for the device path)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = dict(arrays)
        self.length = len(next(iter(self.arrays.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a split of {self.length} examples")
        return {k: v[index] for k, v in self.arrays.items()}

    def stacked(self, *, threads: int = 2) -> dict[str, np.ndarray]:
        return dict(self.arrays)


def stack(examples: Sequence[Example]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def parallel_map(function, items: Sequence, threads: int) -> list:
    """``[function(item) for item in items]`` on ``threads`` threads (PIL releases the GIL while it draws)."""
    if threads <= 1 or len(items) < 64:
        return [function(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items, chunksize=64))
