"""``image_folder``: classification images in one sub-folder per class (JPEG/PNG/..., any size).

Layouts: ``path/<class>/*.jpg`` split into train/test by ``test_fraction`` (seeded, stratified), or
``path/train/<class>/...`` and ``path/test/<class>/...`` used as given. Images are stored as they are
(JPEG/PNG bytes already in the wanted mode are kept byte for byte; others become PNG) and resized
when read, so one prepared copy serves every ``image_size``. Corrupt files are skipped or fail the
run (``on_corrupt``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow_datasets as tfds

from prism.framework.errors import DataError
from prism.framework.registry import DATASETS
from prism.plugins.datasets._folder_common import (
    CorruptImages,
    FolderConfig,
    check_folder_config,
    folder_identity,
    image_files,
    image_paths,
    natural_key,
    stratified_test_mask,
)
from prism.plugins.datasets._parallel_read import encoded_images, headers
from prism.plugins.datasets.tfds_source import Plan, TFDSSource, load_or_prepare

VERSION = "1.0.0"


@dataclass
class ImageFolderConfig(FolderConfig):
    """A folder of class folders (see :class:`FolderConfig` for the fields); class names are the folder names."""


def class_folders(folder: Path) -> list[Path]:
    """The class sub-folders of ``folder``, each holding at least one image."""
    classes = sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if not classes:
        raise DataError(f"{folder}: no class sub-folders; expected one folder of images per class "
                        f"(or train/ and test/ folders holding them)")
    for d in classes:
        if not image_files(d):
            raise DataError(f"class folder {d} is empty: it has no images (.jpg, .png, ...)")
    return classes


def _split_layout(root: Path) -> dict[str, Path] | None:
    if (root / "train").is_dir() and (root / "test").is_dir():
        return {"train": root / "train", "test": root / "test"}
    return None


def scan(root: Path, cfg: ImageFolderConfig, corrupt: CorruptImages) -> Plan:
    """Find and check every image, assign splits, and describe the dataset to write."""
    layout = _split_layout(root)
    class_names = [d.name for d in class_folders(layout["train"] if layout else root)]
    labelled: dict[str, list[tuple[Path, int]]] = {}
    for split, folder in (layout or {"all": root}).items():
        labelled[split] = []
        for d in class_folders(folder):
            if d.name not in class_names:
                raise DataError(f"class folder {d} has no counterpart in {layout['train']}: label out of range "
                                f"(classes: {', '.join(class_names)})")
            labelled[split] += [(f, class_names.index(d.name)) for f in image_files(d)]
    shapes: set[tuple[int, int]] = set()
    for split, items in labelled.items():
        kept = []
        for (path, label), (ok, header) in zip(items, headers([p for p, _ in items]), strict=True):
            if ok:
                shapes.add(header[0])
                kept.append((path, label))
            else:
                corrupt.handle(path, header)
        labelled[split] = kept
    if not layout:
        test = stratified_test_mask([label for _, label in labelled["all"]], cfg.test_fraction, cfg.split_seed)
        labelled = {"train": [x for x, t in zip(labelled["all"], test, strict=True) if not t],
                    "test": [x for x, t in zip(labelled["all"], test, strict=True) if t]}

    def examples(items: list[tuple[Path, int]]):
        def generate():
            read = encoded_images([p for p, _ in items], cfg.channels)  # every core, in order
            for (path, label), (ok, value) in zip(items, read, strict=True):
                if not ok:
                    corrupt.handle(path, value)
                    continue
                yield {"image": value[0], "label": label, "filename": str(path.relative_to(root))}
        return generate

    height, width = shapes.pop() if len(shapes) == 1 else (None, None)
    return Plan(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(height, width, cfg.channels)),
            "label": tfds.features.ClassLabel(names=class_names),
            "filename": tfds.features.Text(),
        }),
        splits={split: examples(items) for split, items in labelled.items() if items},
        description=f"image folder {root}",
    )


@DATASETS.register("image_folder", config=ImageFolderConfig,
                   description="Images in one folder per class (train/ and test/ or a seeded split).")
def build_image_folder(cfg: ImageFolderConfig) -> TFDSSource:
    root = check_folder_config(cfg, "image_folder")
    corrupt = CorruptImages(cfg.on_corrupt, "image_folder")
    options = {"channels": cfg.channels, "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed,
               "on_corrupt": cfg.on_corrupt}
    identity = folder_identity(root, image_paths(str(root)), options)
    builder, prepared_now = load_or_prepare("image_folder", identity, data_dir=cfg.data_dir, version=VERSION,
                                            make_plan=lambda: scan(root, cfg, corrupt))
    if prepared_now:
        corrupt.report()
    return TFDSSource(builder, dataset=f"image_folder ({root})", used_splits=(cfg.train_split, cfg.eval_split),
                      image_size=cfg.image_size, mean=list(cfg.mean) or None, std=list(cfg.std) or None,
                      cache=cfg.cache)
