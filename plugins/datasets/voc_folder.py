"""``voc_folder``: object detection from images plus Pascal VOC XML annotations.

``path/<images>/`` holds the images and ``path/<annotations>/*.xml`` one VOC file per image (its
``<filename>`` names the image; ``<object>``s give ``<name>`` and a pixel ``<bndbox>``). The split
comes from list files (``train_list`` / ``test_list``: a CSV with a ``filename`` column, as the
raccoon set's ``data/*_labels.csv``, or a text file of image names or stems, as VOC's ImageSets) or
else from a seeded ``test_fraction``. Boxes are stored normalized (``ymin, xmin, ymax, xmax`` in
[0, 1]), so they stay right when images are resized on reading. Examples carry ``boxes``
(max_boxes, 4) float32, ``box_valid`` (max_boxes,) bool and ``labels`` (max_boxes,) int32, padded.
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._folder_common import (
    CorruptImages,
    FolderConfig,
    check_folder_config,
    folder_identity,
    natural_key,
    random_test_mask,
    require_dir,
)
from prism.plugins.datasets._parallel_read import DECODE_ERRORS, encoded_image, read_header
from prism.plugins.datasets.tfds_source import Example, Plan, TFDSSource, fit_image, load_or_prepare

log = logging.getLogger("prism")

VERSION = "1.0.0"


@dataclass
class VOCFolderConfig(FolderConfig):
    """Pascal VOC detection folder (shared fields: :class:`FolderConfig`).

    images / annotations: sub-folders of ``path`` with the images and the XML files.
    classes: the class names, in label order; empty: every object name found, sorted. An object whose
        name is not listed is an error.
    train_list / test_list: files (relative to ``path``) naming each split's images; empty: ``test_fraction``.
    max_boxes: boxes per example after padding; an image with more objects is an error.
    on_bad_annotation: 'fail' (raise, naming the XML file) or 'skip' (leave it out and log it) for an
        annotation whose image is missing and for a box outside its image or of non-positive size (the
        object is skipped; its image is kept).
    """

    images: str = "images"
    annotations: str = "annotations"
    classes: list[str] = field(default_factory=list)
    train_list: str = ""
    test_list: str = ""
    max_boxes: int = field(default=32, metadata={"ge": 1})
    on_bad_annotation: str = field(default="fail", metadata={"choices": ("fail", "skip")})


class BadAnnotations:
    """Annotation problems: raised at once (``fail``) or collected, skipped and logged (``skip``)."""

    def __init__(self, policy: str) -> None:
        if policy not in ("fail", "skip"):
            raise ConfigError(f"dataset.on_bad_annotation must be 'fail' or 'skip', got {policy!r}")
        self.policy, self.messages = policy, []

    def handle(self, message: str) -> None:
        if self.policy == "fail":
            raise DataError(f"{message} (dataset.on_bad_annotation=skip leaves such annotations out)")
        self.messages.append(message)

    def report(self) -> None:
        if self.messages:
            log.warning("dataset voc_folder: skipped %d bad annotation(s): %s", len(self.messages),
                        "; ".join(self.messages))


@dataclass
class Annotation:
    xml: Path
    image: Path
    names: list[str]
    boxes: list[tuple[float, float, float, float]]  # pixels: xmin, ymin, xmax, ymax
    size: tuple[int, int] | None  # (height, width) stated by the XML, if any


def parse_voc(xml: Path, image_dir: Path, problems: BadAnnotations | None = None) -> Annotation | None:
    """One VOC XML file; its image must exist (else ``problems`` decides: error, or None to skip it)."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{xml}: not a readable VOC XML file ({exc})") from None
    filename = (root.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
    image = image_dir / filename
    if not image.is_file():
        (problems or BadAnnotations("fail")).handle(f"{xml}: annotation references a missing image {image}")
        return None
    names, boxes = [], []
    for i, obj in enumerate(root.findall("object")):
        try:
            box = tuple(float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DataError(f"{xml}: object {i} has no numeric bndbox xmin/ymin/xmax/ymax") from None
        names.append((obj.findtext("name") or "").strip())
        boxes.append(box)
    width, height = (int(float(root.findtext(f"size/{k}") or 0)) for k in ("width", "height"))
    return Annotation(xml, image, names, boxes, (height, width) if height and width else None)


def normalized_boxes(ann: Annotation, height: int, width: int,
                     problems: BadAnnotations | None = None) -> list[tuple[tfds.features.BBox, str]]:
    """``(box, class name)`` pairs, boxes as TFDS BBoxes in [0, 1]; a box outside the image or without area is an
    error, or skipped (``problems``)."""
    problems = problems or BadAnnotations("fail")
    if ann.size is not None and ann.size != (height, width):
        raise DataError(f"{ann.xml}: states size {ann.size[1]}x{ann.size[0]} but {ann.image} is {width}x{height}")
    out = []
    for i, ((xmin, ymin, xmax, ymax), name) in enumerate(zip(ann.boxes, ann.names, strict=True)):
        if xmax <= xmin or ymax <= ymin:
            problems.handle(f"{ann.xml}: object {i} box (xmin={xmin}, ymin={ymin}, xmax={xmax}, ymax={ymax}) "
                            f"has non-positive size")
            continue
        if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
            problems.handle(f"{ann.xml}: object {i} box (xmin={xmin}, ymin={ymin}, xmax={xmax}, ymax={ymax}) "
                            f"lies outside the {width}x{height} image {ann.image}")
            continue
        out.append((tfds.features.BBox(ymin / height, xmin / width, ymax / height, xmax / width), name))
    return out


def read_list(path: Path) -> list[str]:
    """Image names from a split list: a CSV with a ``filename`` column, or one name or stem per line."""
    if not path.is_file():
        raise DataError(f"split list {path} does not exist")
    text = path.read_text()
    first = text.splitlines()[0] if text.strip() else ""
    if "filename" in [c.strip() for c in first.split(",")]:
        names = [row["filename"].strip() for row in csv.DictReader(text.splitlines())]
    else:
        names = [line.split()[0] for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(names))  # unique, in order


def _assign_splits(root: Path, cfg: VOCFolderConfig, anns: list[Annotation],
                   skipped: set[str] = frozenset()) -> dict[str, list[Annotation]]:
    """Split the annotations; ``skipped`` image names and stems (bad annotations left out) leave the lists too."""
    if not (cfg.train_list or cfg.test_list):
        test = random_test_mask(len(anns), test_fraction=cfg.test_fraction, test_count=0, seed=cfg.split_seed)
        return {"train": [a for a, t in zip(anns, test, strict=True) if not t],
                "test": [a for a, t in zip(anns, test, strict=True) if t]}
    if not (cfg.train_list and cfg.test_list):
        raise ConfigError("dataset.train_list and dataset.test_list go together: give both or neither")
    by_name = {a.image.name: a for a in anns} | {a.image.stem: a for a in anns}
    splits = {}
    for split, list_file in (("train", cfg.train_list), ("test", cfg.test_list)):
        names = [n for n in read_list(root / list_file) if n not in skipped]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(f"{root / list_file}: {len(unknown)} image(s) without an annotation in "
                            f"{root / cfg.annotations}: {', '.join(unknown[:5])}")
        splits[split] = [by_name[n] for n in names]
    return splits


def scan(root: Path, cfg: VOCFolderConfig, corrupt: CorruptImages, problems: BadAnnotations | None = None) -> Plan:
    """Parse and check every annotation, assign splits, and describe the dataset to write."""
    problems = problems or BadAnnotations(cfg.on_bad_annotation)
    image_dir = require_dir(root / cfg.images, "dataset.images")
    xml_dir = require_dir(root / cfg.annotations, "dataset.annotations")
    xmls = sorted(xml_dir.glob("*.xml"), key=natural_key)
    if not xmls:
        raise DataError(f"{xml_dir}: no VOC .xml annotation files")
    parsed = [(x, parse_voc(x, image_dir, problems)) for x in xmls]
    anns = [a for _, a in parsed if a is not None]
    skipped = set()
    for x, a in parsed:
        if a is None:
            filename = (ET.parse(x).getroot().findtext("filename") or "").strip() or f"{x.stem}.jpg"
            skipped.update((filename, Path(filename).stem))
    found = sorted({n for a in anns for n in a.names})
    classes = list(cfg.classes) or found
    for a in anns:
        for i, name in enumerate(a.names):
            if name not in classes:
                raise DataError(f"{a.xml}: object {i} has class {name!r}, not in dataset.classes "
                                f"({', '.join(classes)}): label out of range")
    splits = _assign_splits(root, cfg, anns, skipped)
    kept: dict[str, list[tuple[Annotation, list]]] = {}
    shapes: set[tuple[int, int]] = set()
    for split, items in splits.items():
        kept[split] = []
        for a in items:
            try:
                size = read_header(a.image)[0]
            except DECODE_ERRORS as exc:
                corrupt.handle(a.image, exc)
                continue
            kept[split].append((a, normalized_boxes(a, *size, problems)))
            shapes.add(size)

    def examples(items: list[tuple[Annotation, list]]):
        def generate():
            for a, objects in items:
                try:
                    data, _ = encoded_image(a.image, cfg.channels)
                except DECODE_ERRORS as exc:
                    corrupt.handle(a.image, exc)
                    continue
                yield {"image": data, "objects": [{"bbox": b, "label": classes.index(n)} for b, n in objects],
                       "filename": a.image.name}
        return generate

    height, width = shapes.pop() if len(shapes) == 1 else (None, None)
    busiest = max((item for items in kept.values() for item in items), key=lambda item: len(item[1]), default=None)
    return Plan(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(height, width, cfg.channels)),
            "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                               "label": tfds.features.ClassLabel(names=classes)}),
            "filename": tfds.features.Text(),
        }),
        splits={split: examples(items) for split, items in kept.items() if items},
        description=f"VOC detection folder {root}",
        metadata={"max_objects": len(busiest[1]) if busiest else 0,
                  "max_objects_image": busiest[0].image.name if busiest else ""},
    )


class DetectionExample:
    """TFDS detection example -> image, padded normalized ``boxes``, ``box_valid`` and ``labels``."""

    def __init__(self, max_boxes: int, size: tuple[int, int] | None) -> None:
        self.max_boxes, self.size = max_boxes, size

    def __call__(self, example: Mapping[str, Any]) -> Example:
        objects = example["objects"]
        boxes = np.asarray(objects["bbox"], dtype=np.float32).reshape(-1, 4)[: self.max_boxes]
        labels = np.asarray(objects["label"], dtype=np.int32).reshape(-1)[: self.max_boxes]
        n = len(boxes)
        out_boxes = np.zeros((self.max_boxes, 4), np.float32)
        out_labels = np.zeros((self.max_boxes,), np.int32)
        out_boxes[:n], out_labels[:n] = boxes, labels
        return {"image": fit_image(np.asarray(example["image"]), self.size), "boxes": out_boxes,
                "box_valid": np.arange(self.max_boxes) < n, "labels": out_labels}


class DetectionSource(TFDSSource):
    """A TFDS detection dataset (``objects``: bbox + label) as padded box arrays."""

    def __init__(self, builder: tfds.core.DatasetBuilder, *, max_boxes: int, **kwargs: Any) -> None:
        if max_boxes < 1:
            raise ConfigError(f"dataset.max_boxes must be >= 1, got {max_boxes}")
        most = int(builder.info.metadata.get("max_objects", 0))
        if most > max_boxes:
            where = builder.info.metadata.get("max_objects_image", "")
            raise ConfigError(f"image {where} has {most} objects but dataset.max_boxes={max_boxes}; "
                              f"raise dataset.max_boxes")
        self.max_boxes = max_boxes
        super().__init__(builder, label_key="objects/label", **kwargs)

    def make_converter(self) -> DetectionExample:
        return DetectionExample(self.max_boxes, self.resize_to)


@DATASETS.register("voc_folder", config=VOCFolderConfig,
                   description="Object detection: images + Pascal VOC XML (boxes, class names).")
def build_voc_folder(cfg: VOCFolderConfig) -> DetectionSource:
    root = check_folder_config(cfg, "voc_folder")
    corrupt = CorruptImages(cfg.on_corrupt, "voc_folder")
    problems = BadAnnotations(cfg.on_bad_annotation)
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    options = {"channels": cfg.channels, "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed,
               "on_corrupt": cfg.on_corrupt, "images": cfg.images, "annotations": cfg.annotations,
               "classes": list(cfg.classes), "train_list": cfg.train_list, "test_list": cfg.test_list,
               "on_bad_annotation": cfg.on_bad_annotation}
    identity = folder_identity(root, files, options)
    builder, prepared_now = load_or_prepare("voc_folder", identity, data_dir=cfg.data_dir, version=VERSION,
                                            make_plan=lambda: scan(root, cfg, corrupt, problems))
    if prepared_now:
        corrupt.report()
        problems.report()
    return DetectionSource(builder, max_boxes=cfg.max_boxes, dataset=f"voc_folder ({root})",
                           used_splits=(cfg.train_split, cfg.eval_split),
                           image_size=cfg.image_size, mean=list(cfg.mean) or None, std=list(cfg.std) or None,
                           cache=cfg.cache)
