"""``mask_folder``: semantic segmentation from image/mask pairs (``path/<images>/x.png`` + ``path/<masks>/x.png``).

Masks are mapped to class ids when prepared: by ``mask_values`` (the i-th listed pixel value is class
i; any other value is an error) or, by default, two classes split at ``mask_threshold`` (0/255 masks
-> 0/1). They are stored as PNG class-id images next to the images, and both are resized when read
(image bilinear, mask nearest). Examples carry ``image`` (H, W, C) uint8 and ``mask`` (H, W) int32.
The test split holds ``test_count`` random pairs (or ``test_fraction`` of them), seeded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._folder_common import (
    CorruptImages,
    FolderConfig,
    check_folder_config,
    folder_identity,
    image_files,
    image_paths,
    random_test_mask,
    require_dir,
)
from prism.plugins.datasets._parallel_read import DECODE_ERRORS, encoded_image, read_header
from prism.plugins.datasets.tfds_source import (
    Example,
    Plan,
    TFDSSource,
    fit_image,
    fit_mask,
    load_or_prepare,
    png_bytes,
)

VERSION = "1.0.0"
log = logging.getLogger("prism")


@dataclass
class MaskFolderConfig(FolderConfig):
    """Image/mask pairs matched by file stem (shared fields: :class:`FolderConfig`).

    images / masks: sub-folders of ``path`` with the images and the masks.
    num_classes: number of classes; class_names: their names (empty: "0", "1", ...).
    mask_values: pixel value of each class, in class order (e.g. [0, 128, 255]); empty: two classes,
        pixel >= mask_threshold is class 1.
    test_count: hold out this many random pairs as ``test`` (0: use test_fraction).
    mask_pattern: the name of an image's mask, from the image's stem: ``{stem}`` (default: the same stem, any
        image extension), ``{stem}_mask`` (``x_mask.png`` for ``x.jpg``), ``{stem}_mask.png`` (that extension
        only). With a pattern other than ``{stem}`` the masks may sit beside the images (``dataset.masks``
        equal to ``dataset.images``): files named like masks are not taken for images.
    on_size_mismatch: a mask whose size differs from its image's: 'fail' (error naming both files) or
        'skip' (leave the pair out and log its files).
    """

    images: str = "image"
    masks: str = "label"
    num_classes: int = field(default=2, metadata={"ge": 2})
    class_names: list[str] = field(default_factory=list)
    mask_threshold: int = field(default=128, metadata={"ge": 1, "le": 255})
    mask_values: list[int] = field(default_factory=list, metadata={"ge": 0, "le": 255})
    test_count: int = field(default=0, metadata={"ge": 0})
    on_size_mismatch: str = field(default="fail", metadata={"choices": ("fail", "skip")})
    mask_pattern: str = "{stem}"


def _check(cfg: MaskFolderConfig) -> None:
    if cfg.mask_values and len(cfg.mask_values) != cfg.num_classes:
        raise ConfigError(f"dataset.mask_values lists {len(cfg.mask_values)} values for dataset.num_classes="
                          f"{cfg.num_classes}; give one value per class")
    if not cfg.mask_values and cfg.num_classes != 2:
        raise ConfigError(f"dataset.num_classes={cfg.num_classes} needs dataset.mask_values (one pixel value per "
                          f"class); mask_threshold only makes two classes")
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"dataset.class_names has {len(cfg.class_names)} names for {cfg.num_classes} classes")
    if cfg.on_size_mismatch not in ("fail", "skip"):
        raise ConfigError(f"dataset.on_size_mismatch must be 'fail' or 'skip', got {cfg.on_size_mismatch!r}")
    if cfg.test_count < 0:
        raise ConfigError(f"dataset.test_count must be >= 0, got {cfg.test_count}")
    if cfg.mask_pattern.count("{stem}") != 1 or "/" in cfg.mask_pattern:
        raise ConfigError(f"dataset.mask_pattern must hold {{stem}} once (e.g. '{{stem}}_mask' or "
                          f"'{{stem}}_mask.png'), a file name without folders; got {cfg.mask_pattern!r}")
    if cfg.masks == cfg.images and cfg.mask_pattern == "{stem}":
        raise ConfigError(f"dataset.masks and dataset.images are both {cfg.images!r}: set dataset.mask_pattern "
                          f"(e.g. '{{stem}}_mask') so that masks and images can be told apart")


def mask_stem_matcher(pattern: str) -> Callable[[str], str | None]:
    """``file name -> the stem of its image`` for masks named by ``pattern`` (see ``mask_pattern``); None for a
    name the pattern does not give."""
    head, tail = pattern.split("{stem}")
    extension = "" if Path(tail).suffix else r"\.[^.]+"  # an extension in the pattern: that one only
    regex = re.compile(re.escape(head) + r"(?P<stem>.+)" + re.escape(tail) + extension + "$")
    return lambda name: found.group("stem") if (found := regex.match(name)) else None


def pair_files(image_dir: Path, mask_dir: Path, pattern: str = "{stem}") -> list[tuple[Path, Path]]:
    """(image, mask) pairs, each mask named by ``pattern`` from its image's stem; an image without a mask, or a
    mask without an image, is an error."""
    stem_of = mask_stem_matcher(pattern)
    masks = {}
    for path in image_files(mask_dir):
        stem = stem_of(path.name)
        if stem is not None:
            masks[path.relative_to(mask_dir).parent / stem] = path
    named_as_masks = set(masks.values())
    images = {p.relative_to(image_dir).with_suffix(""): p for p in image_files(image_dir) if p not in named_as_masks}
    if not images:
        raise DataError(f"{image_dir}: no images (.png, .jpg, ...)")
    if orphans := sorted(set(masks) - set(images)):
        raise DataError(f"mask {masks[orphans[0]]} has no image in {image_dir} ({len(orphans)} such masks)")
    if unmasked := sorted(set(images) - set(masks)):
        raise DataError(f"image {images[unmasked[0]]} has no mask in {mask_dir} ({len(unmasked)} such images)")
    return [(images[k], masks[k]) for k in images]


def class_ids(mask_path: Path, cfg: MaskFolderConfig) -> np.ndarray:
    """The mask as uint8 class ids (palette masks give their indices, others their gray levels)."""
    with Image.open(mask_path) as im:
        values = np.asarray(im if im.mode in ("L", "P", "1") else im.convert("L"), dtype=np.int64)
    if not cfg.mask_values:
        return (values >= cfg.mask_threshold).astype(np.uint8)
    lut = np.full(max(int(values.max()), *cfg.mask_values) + 1, -1, np.int64)
    lut[list(cfg.mask_values)] = np.arange(len(cfg.mask_values))
    ids = lut[values]
    if (ids < 0).any():
        bad = np.unique(values[ids < 0]).tolist()
        raise DataError(f"mask {mask_path} has pixel values {bad[:10]} outside dataset.mask_values "
                        f"{list(cfg.mask_values)}: label out of range")
    return ids.astype(np.uint8)


def scan(root: Path, cfg: MaskFolderConfig, corrupt: CorruptImages) -> Plan:
    """Pair and check every image and mask, assign splits, and describe the dataset to write."""
    image_dir, mask_dir = root / cfg.images, root / cfg.masks
    pairs, shapes = [], set()
    for image, mask in pair_files(image_dir, mask_dir, cfg.mask_pattern):
        try:
            image_size, mask_size = read_header(image)[0], read_header(mask)[0]
        except DECODE_ERRORS as exc:
            corrupt.handle(image, exc)
            continue
        if image_size != mask_size:
            problem = (f"mask {mask} is {mask_size[1]}x{mask_size[0]} but its image {image} is "
                       f"{image_size[1]}x{image_size[0]}")
            if cfg.on_size_mismatch == "fail":
                raise DataError(f"{problem}; fix the pair or set dataset.on_size_mismatch=skip")
            log.warning("dataset mask_folder: skipped a pair: %s", problem)
            continue
        pairs.append((image, mask))
        shapes.add(image_size)
    test = random_test_mask(len(pairs), test_fraction=cfg.test_fraction, test_count=cfg.test_count,
                            seed=cfg.split_seed)

    def examples(items: list[tuple[Path, Path]]):
        def generate():
            for image, mask in items:
                try:
                    data, _ = encoded_image(image, cfg.channels)
                    ids = class_ids(mask, cfg)
                except DECODE_ERRORS as exc:
                    corrupt.handle(image, exc)
                    continue
                yield {"image": data, "mask": png_bytes(ids), "filename": str(image.relative_to(image_dir))}
        return generate

    splits = {"train": [p for p, t in zip(pairs, test, strict=True) if not t],
              "test": [p for p, t in zip(pairs, test, strict=True) if t]}
    height, width = shapes.pop() if len(shapes) == 1 else (None, None)
    names = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
    return Plan(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(height, width, cfg.channels)),
            "mask": tfds.features.Image(shape=(height, width, 1)),
            "filename": tfds.features.Text(),
        }),
        splits={split: examples(items) for split, items in splits.items() if items},
        description=f"image/mask folder {root}",
        metadata={"num_classes": cfg.num_classes, "class_names": names},
    )


class SegmentationExample:
    """TFDS segmentation example -> ``image`` (H, W, C) uint8 and ``mask`` (H, W) int32 class ids."""

    def __init__(self, size: tuple[int, int] | None) -> None:
        self.size = size

    def __call__(self, example: Mapping[str, Any]) -> Example:
        return {"image": fit_image(np.asarray(example["image"]), self.size),
                "mask": fit_mask(np.asarray(example["mask"]), self.size)}


class SegmentationSource(TFDSSource):
    """A TFDS segmentation dataset (``image`` + ``mask`` features); classes come from its metadata."""

    def __init__(self, builder: tfds.core.DatasetBuilder, **kwargs: Any) -> None:
        meta = builder.info.metadata
        super().__init__(builder, num_classes=int(meta["num_classes"]), class_names=meta["class_names"], **kwargs)

    def make_converter(self) -> SegmentationExample:
        return SegmentationExample(self.resize_to)


@DATASETS.register("mask_folder", config=MaskFolderConfig,
                   description="Semantic segmentation: image/mask pairs matched by file name.")
def build_mask_folder(cfg: MaskFolderConfig) -> SegmentationSource:
    root = check_folder_config(cfg, "mask_folder")
    _check(cfg)
    corrupt = CorruptImages(cfg.on_corrupt, "mask_folder")
    image_dir = require_dir(root / cfg.images, "dataset.images")
    mask_dir = require_dir(root / cfg.masks, "dataset.masks")
    files = [*image_paths(str(image_dir)), *image_paths(str(mask_dir))]
    options = {"channels": cfg.channels, "test_fraction": cfg.test_fraction, "test_count": cfg.test_count,
               "split_seed": cfg.split_seed, "on_corrupt": cfg.on_corrupt, "images": cfg.images, "masks": cfg.masks,
               "num_classes": cfg.num_classes, "class_names": list(cfg.class_names),
               "mask_threshold": cfg.mask_threshold, "mask_values": list(cfg.mask_values),
               "on_size_mismatch": cfg.on_size_mismatch, "mask_pattern": cfg.mask_pattern}
    identity = folder_identity(root, files, options)
    builder, prepared_now = load_or_prepare("mask_folder", identity, data_dir=cfg.data_dir, version=VERSION,
                                            make_plan=lambda: scan(root, cfg, corrupt))
    if prepared_now:
        corrupt.report()
    return SegmentationSource(builder, dataset=f"mask_folder ({root})", used_splits=(cfg.train_split, cfg.eval_split),
                              image_size=cfg.image_size, mean=list(cfg.mean) or None, std=list(cfg.std) or None,
                              cache=cfg.cache)
