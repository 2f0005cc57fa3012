"""``rendered_text``: text lines drawn with the machine's TrueType fonts, for OCR without a labelled corpus.

Example ``i`` of a split is a pure function of (``seed``, split, ``i``): a string of ``min_length`` to
``max_length`` characters drawn uniformly from ``alphabet``, rendered with one of the split's fonts at a random
size, character spacing and slant, cropped to its ink, scaled to the image height (squeezed to the width when
longer, else placed at a random offset), with random foreground/background grey levels, Gaussian blur and
pixel noise. The fonts found by the ``fonts`` glob are split once, seeded: ``test_fonts`` of them are used only
by the ``test`` split, so test accuracy is measured on typefaces the model never saw. Fonts that lack a glyph
of the alphabet are left out (and logged).

Examples are text-line examples (``image``, ``text``, ``text_length``; see ``_text_common``); with ``cache`` each
one is rendered once per process and kept in memory (the device path renders a whole split on its threads).
"""

from __future__ import annotations

import functools
import glob
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._text_common import (
    DEFAULT_ALPHABET,
    Example,
    check_alphabet,
    image_statistics,
    parallel_map,
    stack,
    text_info,
)

log = logging.getLogger("prism")

SPLIT_IDS = {"train": 0, "test": 1}
#: A code point no font maps: what a font draws for a character it lacks.
MISSING_GLYPH = "\U0010fffd"


@dataclass
class RenderedTextConfig:
    """Rendered text lines; the ``test`` split uses only held-out fonts.

    alphabet: the characters lines are drawn from (quote it in overrides: "dataset.alphabet='0123456789'").
    min_length / max_length: characters per line, uniform in [min_length, max_length]; ``text`` is padded to
        max_length.
    image_size: [H, W] of the grey images.
    fonts: glob of the TrueType/OpenType files to use (recursive ``**``); sorted, then split by ``seed``.
    test_fonts: how many of them only the test split uses.
    train_size / test_size: lines per split.
    font_size: [min, max] point size the text is drawn at before it is scaled to the image height (thinner or
        thicker strokes after scaling).
    spacing: [min, max] extra space between characters, as a fraction of the font size (negative: tighter).
    slant: largest horizontal shear (|dx/dy|), drawn uniformly in [-slant, slant].
    blur: largest Gaussian blur radius in output pixels, uniform in [0, blur].
    noise: largest std of additive Gaussian pixel noise as a fraction of 255, uniform in [0, noise].
    min_contrast: smallest grey-level difference between background and text, as a fraction of 255.
    seed: seed of the font split and of every line.
    cache: keep each rendered example in memory (rendered once per process instead of at every read).
    """

    alphabet: str = DEFAULT_ALPHABET
    min_length: int = field(default=3, metadata={"ge": 0})
    max_length: int = field(default=8, metadata={"ge": 1})
    image_size: list[int] = field(default_factory=lambda: [32, 128], metadata={"ge": 8})
    fonts: str = "/usr/share/fonts/**/*.ttf"
    test_fonts: int = field(default=4, metadata={"ge": 1})
    train_size: int = field(default=20_000, metadata={"ge": 1})
    test_size: int = field(default=2_000, metadata={"ge": 1})
    font_size: list[int] = field(default_factory=lambda: [20, 36], metadata={"ge": 6})
    spacing: list[float] = field(default_factory=lambda: [-0.02, 0.2], metadata={"ge": -0.5, "le": 2})
    slant: float = field(default=0.25, metadata={"ge": 0, "le": 1})
    blur: float = field(default=0.8, metadata={"ge": 0, "le": 5})
    noise: float = field(default=0.06, metadata={"ge": 0, "le": 1})
    min_contrast: float = field(default=0.4, metadata={"gt": 0, "le": 1})
    seed: int = field(default=0, metadata={"ge": 0})
    cache: bool = True
    train_split: str = "train"
    eval_split: str = "test"


def find_fonts(pattern: str) -> list[Path]:
    """The font files ``pattern`` matches, sorted; a DataError saying how to install fonts when there are none."""
    paths = sorted({Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True)
                    if p.lower().endswith((".ttf", ".otf"))})
    if not paths:
        raise DataError(f"dataset.fonts={pattern!r} matches no .ttf/.otf font file: install fonts "
                        f"(apt-get install fonts-dejavu-core) or point dataset.fonts at some")
    return paths


@functools.lru_cache(maxsize=1024)
def covers(path: Path, alphabet: str) -> bool:
    """Whether the font at ``path`` has a glyph for every visible character of ``alphabet``."""
    try:
        font = ImageFont.truetype(str(path), 24)
    except OSError:
        return False
    missing = bytes(font.getmask(MISSING_GLYPH))
    return all(bytes(font.getmask(c)) != missing for c in alphabet if not c.isspace())


def split_fonts(paths: Sequence[Path], alphabet: str, test_fonts: int, seed: int) -> dict[str, list[Path]]:
    """``{"train": [...], "test": [...]}``: the usable fonts, ``test_fonts`` of them (seeded) held out for test."""
    usable = [p for p in paths if covers(p, alphabet)]
    skipped = [p.name for p in paths if p not in usable]
    if skipped:
        log.info("rendered_text: %d font(s) without every character of the alphabet left out: %s", len(skipped),
                 ", ".join(skipped))
    if len(usable) < test_fonts + 1:
        raise DataError(f"rendered_text needs more than dataset.test_fonts={test_fonts} fonts that draw the whole "
                        f"alphabet, found {len(usable)} ({', '.join(p.name for p in usable) or 'none'}); lower "
                        f"dataset.test_fonts or install fonts (apt-get install fonts-dejavu-core fonts-liberation)")
    order = np.random.default_rng(seed).permutation(len(usable))
    held = sorted(usable[i] for i in order[:test_fonts])
    return {"train": [p for p in usable if p not in held], "test": held}


class LineRenderer:
    """Draws one line (picklable settings; fonts are loaded lazily, one copy per thread)."""

    def __init__(self, cfg: RenderedTextConfig) -> None:
        self.cfg = cfg
        self.height, self.width = cfg.image_size
        self._local = threading.local()

    def _font(self, path: Path, size: int) -> ImageFont.FreeTypeFont:
        cache = self._local.__dict__.setdefault("fonts", {})
        if (path, size) not in cache:
            cache[path, size] = ImageFont.truetype(str(path), size)
        return cache[path, size]

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cfg"])

    def text(self, rng: np.random.Generator) -> str:
        cfg = self.cfg
        length = int(rng.integers(cfg.min_length, cfg.max_length + 1))
        return "".join(cfg.alphabet[i] for i in rng.integers(0, len(cfg.alphabet), length))

    def ink(self, text: str, font_path: Path, rng: np.random.Generator) -> np.ndarray:
        """The text's coverage (uint8, 255 = ink), cropped to the ink with a random margin, before scaling."""
        cfg = self.cfg
        size = int(rng.integers(cfg.font_size[0], cfg.font_size[1] + 1))
        spacing = float(rng.uniform(cfg.spacing[0], cfg.spacing[1])) * size
        font = self._font(font_path, size)
        advances = [font.getlength(c) for c in text]
        canvas = Image.new("L", (int(sum(advances) + max(spacing, 0) * len(text) + 2 * size) + 1, 2 * size), 0)
        draw = ImageDraw.Draw(canvas)
        x = float(size) / 2
        for c, advance in zip(text, advances, strict=True):
            draw.text((x, size / 2), c, font=font, fill=255)
            x += advance + spacing
        shear = float(rng.uniform(-cfg.slant, cfg.slant))
        if shear:
            extra = int(abs(shear) * canvas.height) + 1
            wide = Image.new("L", (canvas.width + 2 * extra, canvas.height), 0)
            wide.paste(canvas, (extra, 0))
            # output (x, y) samples input (x + shear * (y - h/2), y): letters lean right for shear < 0
            canvas = wide.transform(wide.size, Image.Transform.AFFINE,
                                    (1, shear, -shear * canvas.height / 2, 0, 1, 0), Image.Resampling.BILINEAR)
        box = canvas.getbbox()
        if box is None:  # an empty or all-space line
            return np.zeros((size, size), np.uint8)
        margin = [int(rng.uniform(0.02, 0.15) * size) for _ in range(4)]
        box = (max(box[0] - margin[0], 0), max(box[1] - margin[1], 0),
               min(box[2] + margin[2], canvas.width), min(box[3] + margin[3], canvas.height))
        return np.asarray(canvas.crop(box))

    def __call__(self, fonts: Sequence[Path], seed: tuple[int, ...]) -> tuple[np.ndarray, str]:
        """``(uint8 image (H, W, 1), text)`` of the line with ``seed``, drawn with one of ``fonts``."""
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        text = self.text(rng)
        font_path = fonts[int(rng.integers(len(fonts)))]
        ink = Image.fromarray(self.ink(text, font_path, rng))
        scaled_width = max(1, round(ink.width * self.height / ink.height))
        ink = ink.resize((min(scaled_width, self.width), self.height), Image.Resampling.BILINEAR)
        coverage = np.zeros((self.height, self.width), np.float32)
        offset = int(rng.integers(0, self.width - ink.width + 1))
        coverage[:, offset:offset + ink.width] = np.asarray(ink, np.float32) / 255.0
        contrast = float(rng.uniform(cfg.min_contrast, 1.0)) * 255.0
        background = float(rng.uniform(contrast, 255.0))
        if rng.random() < 0.5:  # dark text on light ground, or light on dark
            image = background - contrast * coverage
        else:
            image = background - contrast + contrast * coverage
        radius = float(rng.uniform(0, cfg.blur))
        if radius > 0.05:
            blurred = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
            image = np.asarray(blurred, np.float32)
        image = image + rng.normal(0.0, float(rng.uniform(0, cfg.noise)) * 255.0, image.shape)
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)[..., None], text


class RenderedSplit(Sequence):
    """Random access to one split's lines, each rendered from its index (kept once drawn, with ``cache``)."""

    def __init__(self, renderer: LineRenderer, fonts: Sequence[Path], *, size: int, seed: tuple[int, int],
                 alphabet: str, max_length: int, cache: bool) -> None:
        self.renderer, self.fonts, self.size, self.seed = renderer, list(fonts), size, seed
        self.codes = {c: i + 1 for i, c in enumerate(alphabet)}
        self.max_length = max_length
        self._cache: dict[int, Example] | None = {} if cache else None

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> Example:
        image, text = self.renderer(self.fonts, (*self.seed, index))
        codes = np.zeros(self.max_length, np.int32)
        codes[:len(text)] = [self.codes[c] for c in text]
        return {"image": image, "text": codes, "text_length": np.int32(len(text))}

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a split of {self.size} examples")
        index %= self.size
        if self._cache is None:
            return self.render(index)
        if index not in self._cache:
            self._cache[index] = self.render(index)
        return self._cache[index]

    def stacked(self, *, threads: int = 2) -> dict[str, np.ndarray]:
        return stack(parallel_map(self.__getitem__, range(self.size), threads))

    def texts(self, indices: Sequence[int]) -> list[str]:
        """The strings of examples ``indices`` (rendering them)."""
        names = {i: c for c, i in self.codes.items()}
        return ["".join(names[c] for c in self[i]["text"][:self[i]["text_length"]]) for i in indices]


class RenderedTextSource:
    """The rendered_text DataSource: ``train`` and ``test`` splits over disjoint fonts."""

    def __init__(self, cfg: RenderedTextConfig) -> None:
        self.fonts = split_fonts(find_fonts(cfg.fonts), cfg.alphabet, cfg.test_fonts, cfg.seed)
        log.info("rendered_text: %d training fonts, %d held-out test fonts (%s)", len(self.fonts["train"]),
                 len(self.fonts["test"]), ", ".join(p.name for p in self.fonts["test"]))
        renderer = LineRenderer(cfg)
        sizes = {"train": cfg.train_size, "test": cfg.test_size}
        self._splits = {name: RenderedSplit(renderer, self.fonts[name], size=sizes[name],
                                            seed=(cfg.seed, SPLIT_IDS[name]), alphabet=cfg.alphabet,
                                            max_length=cfg.max_length, cache=cfg.cache) for name in sizes}
        sample = RenderedSplit(renderer, self.fonts["train"], size=64, seed=(cfg.seed, 2), alphabet=cfg.alphabet,
                               max_length=cfg.max_length, cache=False)
        mean, std = image_statistics(np.stack([sample[i]["image"] for i in range(len(sample))]))
        self.info = text_info(cfg.alphabet, (*cfg.image_size, 1), sizes, mean=mean, std=std)

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]:
        if name not in self._splits:
            raise ConfigError(f"dataset 'rendered_text' has splits {sorted(self._splits)}, not {name!r}")
        return self._splits[name]


def check_config(cfg: RenderedTextConfig) -> None:
    check_alphabet(cfg.alphabet)
    if len(cfg.image_size) != 2:
        raise ConfigError(f"dataset.image_size must be [H, W], got {list(cfg.image_size)}")
    for key, pair in (("font_size", cfg.font_size), ("spacing", cfg.spacing)):
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ConfigError(f"dataset.{key} must be [min, max] with min <= max, got {list(pair)}")
    if cfg.min_length > cfg.max_length:
        raise ConfigError(f"dataset.min_length={cfg.min_length} is more than dataset.max_length={cfg.max_length}")


@DATASETS.register("rendered_text", config=RenderedTextConfig,
                   description="Text lines rendered with the installed fonts (OCR); test split in held-out fonts.")
def build_rendered_text(cfg: RenderedTextConfig) -> RenderedTextSource:
    check_config(cfg)
    return RenderedTextSource(cfg)
