"""``text_folder``: real text-line images and a labels file, for OCR on your own data.

The folder holds the images (any format PIL reads, any size, sub-folders allowed) and a labels file
(``labels.tsv``): one line per image, ``relative/path.png<TAB>text``; empty lines and lines starting with ``#``
are skipped. The test split is a second labels file (``test_labels``) or a seeded ``test_fraction`` of the lines.
Images are decoded once, converted to grey (or RGB) and resized to ``image_size`` (bilinear), and kept in
memory as text-line examples (``image``, ``text``, ``text_length``; see ``_text_common``). A missing image, an
unreadable one, a line without a tab or a character outside ``alphabet`` is an error naming the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._text_common import (
    DEFAULT_ALPHABET,
    ArraySplit,
    check_alphabet,
    encode,
    image_statistics,
    parallel_map,
    stack,
    text_info,
)


@dataclass
class TextFolderConfig:
    """Images + ``filename<TAB>text`` labels.

    path: the folder holding the images and the labels files.
    labels: the labels file (relative to path, or absolute).
    test_labels: a labels file for the test split; empty: a seeded test_fraction of ``labels``' lines.
    test_fraction / split_seed: the share of lines held out as ``test`` when there is no test_labels, and its seed.
    alphabet: the characters labels may hold (quote it in overrides: "dataset.alphabet='0123456789'").
    max_length: width of the padded ``text`` array; 0: the longest label's length.
    image_size: [H, W] every image is resized to.
    channels: 1 (grey) or 3 (RGB).
    threads: images decoded in parallel when the dataset is opened.
    """

    path: str = ""
    labels: str = "labels.tsv"
    test_labels: str = ""
    test_fraction: float = field(default=0.1, metadata={"gt": 0, "lt": 1})
    split_seed: int = field(default=0, metadata={"ge": 0})
    alphabet: str = DEFAULT_ALPHABET
    max_length: int = field(default=0, metadata={"ge": 0})
    image_size: list[int] = field(default_factory=lambda: [32, 128], metadata={"ge": 1})
    channels: int = field(default=1, metadata={"choices": (1, 3)})
    threads: int = field(default=2, metadata={"ge": 1})
    train_split: str = "train"
    eval_split: str = "test"


@dataclass(frozen=True)
class Line:
    """One labelled image: its file, its text and where the labels file says so (``file:line``)."""

    image: Path
    text: str
    where: str


def read_labels(root: Path, labels: Path, alphabet: str) -> list[Line]:
    """The labelled lines of ``labels``; a DataError naming the file and line for a bad one."""
    if not labels.is_file():
        raise DataError(f"labels file {labels} not found (dataset.labels / dataset.test_labels; expected lines "
                        f"'relative/image.png<TAB>text')")
    lines = []
    for number, raw in enumerate(labels.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        where = f"{labels}:{number}"
        if "\t" not in raw:
            raise DataError(f"{where}: expected 'filename<TAB>text', got {raw[:60]!r} (no tab)")
        name, text = raw.split("\t", 1)
        image = root / name
        if not image.is_file():
            raise DataError(f"{where}: image {name!r} not found in {root}")
        encode(text, alphabet, len(text), where)  # every character in the alphabet
        lines.append(Line(image, text, where))
    if not lines:
        raise DataError(f"labels file {labels} holds no labelled lines ('filename<TAB>text')")
    return lines


def read_line(line: Line, size: tuple[int, int], channels: int) -> np.ndarray:
    try:
        with Image.open(line.image) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, np.uint8).reshape(size[0], size[1], channels)
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{line.where}: image {line.image} cannot be read: {type(exc).__name__}: {exc}") from None


class TextFolderSource:
    def __init__(self, cfg: TextFolderConfig) -> None:
        root = Path(cfg.path).expanduser().resolve()
        resolve = lambda name: Path(name) if Path(name).is_absolute() else root / name  # noqa: E731
        lines = read_labels(root, resolve(cfg.labels), cfg.alphabet)
        if cfg.test_labels:
            split = {"train": lines, "test": read_labels(root, resolve(cfg.test_labels), cfg.alphabet)}
        else:
            order = np.random.default_rng(cfg.split_seed).permutation(len(lines))
            n_test = max(1, round(len(lines) * cfg.test_fraction))
            if n_test >= len(lines):
                raise DataError(f"{resolve(cfg.labels)} has {len(lines)} line(s): too few to hold out "
                                f"dataset.test_fraction={cfg.test_fraction} as a test split and train on the rest")
            held = set(order[:n_test].tolist())
            split = {"train": [x for i, x in enumerate(lines) if i not in held],
                     "test": [x for i, x in enumerate(lines) if i in held]}
        max_length = cfg.max_length or max(len(x.text) for part in split.values() for x in part)
        size = (cfg.image_size[0], cfg.image_size[1])
        self._splits = {}
        for name, part in split.items():
            images = parallel_map(lambda x: read_line(x, size, cfg.channels), part, cfg.threads)
            texts = [encode(x.text, cfg.alphabet, max_length, x.where) for x in part]
            self._splits[name] = ArraySplit({"image": np.stack(images), **stack(
                [{"text": t, "text_length": n} for t, n in texts])})
        mean, std = image_statistics(self._splits["train"].arrays["image"])
        self.info = text_info(cfg.alphabet, (*size, cfg.channels), {k: len(v) for k, v in self._splits.items()},
                              mean=mean, std=std)

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]:
        if name not in self._splits:
            raise ConfigError(f"dataset 'text_folder' has splits {sorted(self._splits)}, not {name!r}")
        return self._splits[name]


@DATASETS.register("text_folder", config=TextFolderConfig,
                   description="Text-line images + a labels file (filename<TAB>text) for OCR.")
def build_text_folder(cfg: TextFolderConfig) -> TextFolderSource:
    check_alphabet(cfg.alphabet)
    if not cfg.path:
        raise ConfigError("dataset 'text_folder' needs dataset.path (the folder with the images and labels.tsv)")
    if not Path(cfg.path).expanduser().is_dir():
        raise DataError(f"dataset.path={cfg.path!r}: no such directory")
    if len(cfg.image_size) != 2:
        raise ConfigError(f"dataset.image_size must be [H, W], got {list(cfg.image_size)}")
    return TextFolderSource(cfg)
