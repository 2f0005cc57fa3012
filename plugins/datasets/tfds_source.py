"""TFDS array_record datasets as prism data sources, and the registered ``tfds`` dataset.

Every dataset in prism is read the same way: a prepared ``tensorflow_datasets`` builder in
array_record format, opened with ``builder.as_data_source(split)`` (random access, no TensorFlow at
run time) and fed to grain by index. :class:`TFDSSource` wraps such a builder into the
:class:`prism.framework.api.DataSource` contract: it maps each TFDS example to the arrays a batch holds
(``image`` uint8 (H, W, C) and ``label`` int32 for classification; subclasses map detection and
segmentation examples), resizes images on the host when the dataset's images vary in size, and
derives :class:`~prism.framework.api.DataInfo` from ``builder.info``.

Prism's own datasets (digits, Fashion-MNIST, image/VOC/mask folders) are TFDS builders generated
from a :class:`Plan` by :func:`load_or_prepare`: prepared once into ``data_dir/<name>/<identity>/``
(the identity encodes the source path, its files and the options, so two sources never collide),
then reused. ``data_dir`` defaults to ``$PRISM_DATA_DIR`` or ``~/tensorflow_datasets``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import struct
import types
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS
from prism.framework.resident import stack_examples

log = logging.getLogger("prism")

DATA_DIR_ENV = "PRISM_DATA_DIR"
Example = dict[str, np.ndarray]


class _DropTFDSChatter(logging.Filter):
    """Hide TFDS warnings that are expected here: custom configs, unprepared variants, PIL decoding."""

    PREFIXES = ("Using custom data configuration", "Variant folder ", "OpenCV is not installed")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


logging.getLogger("absl").addFilter(_DropTFDSChatter())


def default_data_dir() -> str:
    """Where prepared datasets live: ``$PRISM_DATA_DIR``, else TFDS's usual ``~/tensorflow_datasets``."""
    return os.environ.get(DATA_DIR_ENV) or os.path.expanduser("~/tensorflow_datasets")


def resolve_data_dir(data_dir: str) -> Path:
    return Path(os.path.expanduser(data_dir or default_data_dir())).absolute()


def short_identity(label: str, options: Mapping[str, Any]) -> str:
    """A TFDS config name for a prepared variant: a readable slug plus a hash of everything it depends on."""
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:40] or "data"
    digest = hashlib.sha1(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{slug}_{digest}"


# -- preparing prism's own builders ---------------------------------------------------------------
@dataclass
class Plan:
    """Everything a builder needs to write a dataset: its features and an example generator per split.

    ``splits`` maps a split name to a zero-argument function yielding encoded examples (images as
    encoded bytes or file paths, never arrays: encoding arrays would need TensorFlow). ``metadata`` is
    stored beside the data (``metadata.json``) and read back by :class:`TFDSSource`.
    """

    features: tfds.features.FeaturesDict
    splits: Mapping[str, Callable[[], Iterator[dict[str, Any]]]]
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


class _PlanBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder that writes a :class:`Plan` (subclassed per dataset name by :func:`_builder_class`).

    Not registered in TFDS's catalog: the prepared data is read back from its directory, and
    ``tfds.builder('<name>/<identity>', data_dir=...)`` finds it there too.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, plan: Plan, **kwargs: Any) -> None:
        self._plan = plan
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, description=self._plan.description,
                                     features=self._plan.features,
                                     metadata=tfds.core.MetadataDict(self._plan.metadata),
                                     disable_shuffling=True)  # keep source order: example i is traceable

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {name: self._generate_examples(make) for name, make in self._plan.splits.items()}

    def _generate_examples(self, make: Callable[[], Iterator[dict[str, Any]]]) -> Iterator:
        yield from enumerate(make())


def _builder_class(name: str, version: str) -> type[_PlanBuilder]:
    return types.new_class(f"Prism_{name}", (_PlanBuilder,), {"skip_registration": True},
                           lambda ns: ns.update(name=name, VERSION=tfds.core.Version(version)))


def _is_prepared(variant_dir: Path) -> bool:
    return (variant_dir / "dataset_info.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock, so that concurrent runs prepare a dataset once and the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """No TFDS progress bars or banner (printed to stdout) while preparing; prism logs one line instead."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tfds.display_progress_bar(was_active)


def load_or_prepare(name: str, identity: str, *, data_dir: str, make_plan: Callable[[], Plan],
                    version: str = "1.0.0") -> tuple[tfds.core.DatasetBuilder, bool]:
    """The prepared builder of ``name/identity`` in ``data_dir``, preparing it first when missing.

    ``make_plan`` (which scans and validates the source) only runs when the data is not prepared yet.
    Returns ``(builder, prepared_now)``.
    """
    root = resolve_data_dir(data_dir)
    variant = root / name / identity / version
    prepared_now = False
    if not _is_prepared(variant):
        with _file_lock(root / name / identity / ".prepare.lock"):
            if not _is_prepared(variant):
                plan = make_plan()
                builder = _builder_class(name, version)(
                    plan=plan, config=tfds.core.BuilderConfig(name=identity, description=plan.description),
                    data_dir=str(root), file_format="array_record")
                log.info("preparing dataset %s into %s (once; later runs reuse it)", name, variant)
                try:
                    with _quiet_tfds():
                        builder.download_and_prepare()
                except AssertionError as exc:  # TFDS refuses to write a split left empty (all files corrupt)
                    if "No examples were yielded" not in str(exc):
                        raise
                    raise DataError(f"dataset {name}: {exc} (every file of that split was skipped)") from None
                prepared_now = True
    return tfds.builder_from_directory(str(variant)), prepared_now


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W), (H, W, 1) or (H, W, 3) array as PNG bytes (what TFDS Image features are fed here).

    Written directly (one zlib IDAT chunk, no row filters): several times faster than PIL for the small
    images of digits and Fashion-MNIST, and decoded by any PNG reader.
    """
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"png_bytes needs (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8, got {a.shape}")
    height, width = a.shape[:2]
    color_type = 0 if a.ndim == 2 else 2 if a.shape[-1] == 3 else 6  # gray, RGB, RGBA
    rows = np.concatenate([np.zeros((height, 1), np.uint8), a.reshape(height, -1)], axis=1)  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 3))
            + chunk(b"IEND", b""))


# -- reading --------------------------------------------------------------------------------------
def fit_image(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """``image`` (H, W, C) uint8 resized to ``size`` (H, W) with PIL's bilinear filter (unchanged if equal)."""
    if size is None or tuple(image.shape[:2]) == tuple(size):
        return image
    channels = image.shape[-1]
    resized = Image.fromarray(image[..., 0] if channels == 1 else image).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).reshape(size[0], size[1], channels)


def fit_mask(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """An (H, W) or (H, W, 1) class-id mask as (H, W) int32, resized with nearest neighbour to ``size``."""
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if size is not None and tuple(mask.shape) != tuple(size):
        mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size[1], size[0]), Image.Resampling.NEAREST))
    return mask.astype(np.int32)


class ClassificationExample:
    """TFDS example -> ``{"image": uint8 (H, W, C), "label": int32}`` (picklable, for grain workers)."""

    def __init__(self, image_key: str, label_key: str, size: tuple[int, int] | None) -> None:
        self.image_key, self.label_key, self.size = image_key, label_key, size

    def __call__(self, example: Mapping[str, Any]) -> Example:
        return {"image": fit_image(np.asarray(example[self.image_key]), self.size),
                "label": np.asarray(example[self.label_key], dtype=np.int32)}

    def cache_key(self) -> str:
        """What the converted examples depend on besides the stored ones (names a decoded copy)."""
        size = "x".join(map(str, self.size)) if self.size else "stored"
        return f"classification-{self.image_key}-{self.label_key}-{size}"


#: The folder, inside a prepared TFDS variant, of the decoded copies of its splits (see ``MappedSplit.stacked``).
STACKED_DIR = "prism_stacked"
#: Bumped when the layout of a decoded copy changes; older copies are then ignored (and rewritten).
STACKED_FORMAT = 1


class MappedSplit(Sequence):
    """Random access to a TFDS data source with each example converted by ``convert``.

    :meth:`stacked` (the device path's read of a whole split) decodes the split once and keeps that copy
    next to the prepared data, in ``cache_dir``: reading 60,000 CIFAR-10 JPEGs one by one through TFDS and
    PIL costs ~300 us each on the host, loading the decoded arrays back a fraction of a second.
    """

    def __init__(self, source: Sequence, convert: Callable[[Mapping[str, Any]], Example],
                 cache_dir: Path | None = None) -> None:
        self.source, self.convert, self.cache_dir = source, convert, cache_dir

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a split of {len(self)} examples")
        return self.convert(self.source[index % len(self)])

    def stacked(self, *, threads: int = 2) -> dict[str, np.ndarray]:
        """Every example as one array per key: the decoded copy in ``cache_dir`` when there is one (written
        after the first read; a directory it cannot write to only costs the copy)."""
        loaded = self._load_stacked()
        if loaded is not None:
            return loaded
        arrays = stack_examples(self, threads=threads)
        if self.cache_dir is not None:
            self._save_stacked(arrays)
        return arrays

    def _load_stacked(self) -> dict[str, np.ndarray] | None:
        meta_file = self.cache_dir / "meta.json" if self.cache_dir is not None else None
        if meta_file is None or not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != STACKED_FORMAT or meta.get("length") != len(self):
            return None
        return {key: np.load(self.cache_dir / f"{key}.npy") for key in meta["keys"]}

    def _save_stacked(self, arrays: dict[str, np.ndarray]) -> None:
        partial = self.cache_dir.with_name(f"{self.cache_dir.name}.partial-{os.getpid()}")
        try:
            partial.mkdir(parents=True, exist_ok=True)
            for key, value in arrays.items():
                np.save(partial / f"{key}.npy", value)
            meta = {"format": STACKED_FORMAT, "length": len(self), "keys": sorted(arrays)}
            (partial / "meta.json").write_text(json.dumps(meta))
            os.replace(partial, self.cache_dir)  # atomic: a reader sees the whole copy or none
        except OSError as exc:  # read-only or full data directory, or another run wrote it first
            log.info("decoded copy of the split not kept in %s: %s", self.cache_dir, exc)
            for leftover in partial.glob("*") if partial.is_dir() else ():
                leftover.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                partial.rmdir()


class CachedSplit(Sequence):
    """A split decoded once into stacked in-memory arrays: for small datasets read many times (digits)."""

    def __init__(self, split: Sequence[Example]) -> None:
        examples = [split[i] for i in range(len(split))]
        self.arrays = {k: np.stack([e[k] for e in examples]) for k in (examples[0] if examples else {})}
        self.length = len(examples)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a split of {self.length} examples")
        return {k: v[index] for k, v in self.arrays.items()}


def _feature(features: tfds.features.FeaturesDict, key: str) -> Any:
    """The feature at ``key``; ``a/b`` walks into nested dicts and sequences (``objects/label``)."""
    node: Any = features
    for part in key.split("/"):
        if isinstance(node, tfds.features.Sequence):
            node = node.feature
        node = node[part]
    return node


class TFDSSource:
    """A :class:`prism.framework.api.DataSource` over a prepared TFDS builder (array_record, random access).

    ``split(name)`` accepts any TFDS split spec (``train``, ``train[:90%]``, ``train[90%:]``);
    ``used_splits`` are the specs the run trains and evaluates on, whose sizes ``info.splits`` gives.
    Images must have one shape in a batch: when the builder's images vary in size, ``image_size``
    ``(H, W)`` resizes them on the host (PIL bilinear). ``cache`` decodes each split once into memory.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, *, dataset: str, used_splits: Sequence[str],
                 image_key: str = "image", label_key: str = "label", image_size: Sequence[int] = (),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_classes: int | None = None, class_names: Sequence[str] | None = None,
                 cache: bool = False) -> None:
        self.builder, self.dataset, self.cache = builder, dataset, cache
        self.image_key, self.label_key = image_key, label_key
        features = builder.info.features
        image_shape, self.resize_to = self._image_shape(features, image_size)
        if num_classes is None:
            label = self._label_feature(features)
            num_classes, class_names = label.num_classes, tuple(label.names)
        self.convert = self.make_converter()
        self._splits: dict[str, Sequence[Example]] = {}
        self.info = DataInfo(num_classes=int(num_classes), image_shape=image_shape,
                             splits={name: self._split_size(name) for name in used_splits},
                             class_names=tuple(class_names or ()),
                             mean=None if mean is None else tuple(float(m) for m in mean),
                             std=None if std is None else tuple(float(s) for s in std))

    def make_converter(self) -> Callable[[Mapping[str, Any]], Example]:
        """The per-example conversion; detection and segmentation sources override it."""
        return ClassificationExample(self.image_key, self.label_key, self.resize_to)

    def _image_shape(self, features: tfds.features.FeaturesDict,
                     image_size: Sequence[int]) -> tuple[tuple[int, int, int], tuple[int, int] | None]:
        if self.image_key not in features:
            raise ConfigError(f"dataset {self.dataset!r}: no image feature {self.image_key!r} (dataset.image_key); "
                              f"features: {', '.join(features)}")
        shape = tuple(_feature(features, self.image_key).shape)
        if len(shape) != 3 or shape[-1] is None:
            raise DataError(f"dataset {self.dataset!r}: feature {self.image_key!r} is not an (H, W, C) image "
                            f"(shape {shape})")
        if image_size:
            if len(image_size) != 2 or min(image_size) < 1:
                raise ConfigError(f"dataset.image_size must be [height, width], got {list(image_size)}")
            size = (int(image_size[0]), int(image_size[1]))
            return (*size, int(shape[-1])), size
        if None in shape[:2]:
            raise DataError(f"dataset {self.dataset!r}: its images vary in size; set dataset.image_size=[H,W] "
                            f"to resize them on the host")
        return (int(shape[0]), int(shape[1]), int(shape[2])), None

    def _label_feature(self, features: tfds.features.FeaturesDict) -> tfds.features.ClassLabel:
        try:
            label = _feature(features, self.label_key)
        except KeyError:
            raise ConfigError(f"dataset {self.dataset!r}: no label feature {self.label_key!r} (dataset.label_key); "
                              f"features: {', '.join(features)}") from None
        if not isinstance(label, tfds.features.ClassLabel):
            raise DataError(f"dataset {self.dataset!r}: feature {self.label_key!r} is not a ClassLabel "
                            f"({type(label).__name__}), so the number of classes is unknown")
        return label

    def _split_size(self, name: str) -> int:
        try:
            return int(self.builder.info.splits[name].num_examples)
        except (KeyError, ValueError, AssertionError) as exc:
            splits = ", ".join(self.builder.info.splits)
            detail = f" ({exc})" if "[" in name else ""
            raise ConfigError(f"dataset {self.dataset!r} has no split {name!r}; splits: {splits} "
                              f"(TFDS slicing works too, e.g. 'train[:90%]'){detail}") from None

    def _stacked_dir(self, name: str) -> Path | None:
        """Where split ``name``'s decoded copy lives, or None when the converter does not name its output."""
        cache_key = getattr(self.convert, "cache_key", None)
        if cache_key is None:
            return None
        spec = re.sub(r"[^A-Za-z0-9_-]+", "_", name) + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        return Path(str(self.builder.data_dir)) / STACKED_DIR / f"{spec}-{cache_key()}"

    def split(self, name: str) -> Sequence[Example]:
        """Random access to split ``name`` (any TFDS split spec) as example dicts of NumPy arrays."""
        if name not in self._splits:
            self._split_size(name)  # validates the name
            try:
                source = self.builder.as_data_source(split=name)
            except NotImplementedError as exc:
                raise DataError(f"dataset {self.dataset!r} in {self.builder.data_dir} is not stored as array_record "
                                f"(prepare it with file_format='array_record'): {exc}") from None
            split: Sequence[Example] = MappedSplit(source, self.convert, self._stacked_dir(name))
            self._splits[name] = CachedSplit(split) if self.cache else split
        return self._splits[name]


# -- the registered ``tfds`` dataset --------------------------------------------------------------
@dataclass
class TFDSConfig:
    """Any TFDS builder prepared in array_record format (catalog datasets or prism's own builders).

    builder: the TFDS name, optionally with config and version (``mnist``, ``digits/split_1a2b3c4d5e``).
        (``name`` is taken: it selects the prism dataset plugin.)
    data_dir: where it is prepared ('' = $PRISM_DATA_DIR or ~/tensorflow_datasets).
    train_split / eval_split: TFDS split specs, slicing included (``train[:90%]``, ``train[90%:]``).
    image_key / label_key: feature names of the image and its ClassLabel.
    image_size: [H, W] to resize images on the host; required when the images vary in size.
    download: prepare it when missing (catalog datasets may need network and ``pip install tensorflow``).
    mean / std: per-channel normalization of images in [0, 1] (empty: none).
    cache: decode the used splits once into memory (small datasets read for many epochs).
    """

    builder: str = "mnist"
    data_dir: str = ""
    train_split: str = "train"
    eval_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"
    image_size: list[int] = field(default_factory=list, metadata={"ge": 1})
    download: bool = False
    mean: list[float] = field(default_factory=list, metadata={"finite": True})
    std: list[float] = field(default_factory=list, metadata={"gt": 0})
    cache: bool = False


def _prepared_configs(data_dir: Path, name: str) -> list[str]:
    """``name/config`` of every prepared variant of an uncatalogued builder ``name`` under ``data_dir``."""
    found = []
    for config_dir in sorted((data_dir / name).glob("*/")):
        if any(_is_prepared(v) for v in config_dir.iterdir() if v.is_dir()):
            found.append(f"{name}/{config_dir.name}")
    return found


def _prepare_command(name: str, data_dir: Path) -> str:
    return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='{data_dir}', "
            f"file_format='array_record').download_and_prepare()\"")


def open_builder(name: str, data_dir: str, *, download: bool = False) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder ``name`` in ``data_dir`` (array_record), with clear errors when it is not."""
    root = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=str(root), file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        # prism's own builders are not in TFDS's catalog: find their prepared variants on disk.
        base = name.split(":")[0]
        prepared = _prepared_configs(root, base) if "/" not in base else []
        if len(prepared) == 1:
            return tfds.builder(prepared[0], data_dir=str(root), file_format="array_record")
        if len(prepared) > 1:
            raise DataError(f"dataset.builder={name!r}: several prepared variants in {root}; name one of: "
                            f"{', '.join(prepared)}") from None
        raise DataError(f"dataset.builder={name!r}: no such TFDS catalog dataset, and nothing prepared under "
                        f"{root / base} (set dataset.data_dir to where it was prepared)") from None
    if not builder.is_prepared():
        if not download:
            raise DataError(
                f"TFDS dataset {name!r} is not prepared in {root}. Prepare it once with\n  "
                f"{_prepare_command(name, root)}\nor set dataset.download=true. Preparing TFDS catalog datasets "
                f"may need TensorFlow (`pip install tensorflow`, an optional extra); reading them does not.")
        try:
            with _quiet_tfds():
                builder.download_and_prepare()
        except (ImportError, OSError) as exc:
            raise DataError(f"preparing TFDS dataset {name!r} into {root} failed: {type(exc).__name__}: {exc}. "
                            f"Catalog datasets may need network access and `pip install tensorflow`.") from None
    return builder


@DATASETS.register("tfds", config=TFDSConfig,
                   description="Any TFDS dataset prepared as array_record (read without TensorFlow).")
def build_tfds(cfg: TFDSConfig) -> TFDSSource:
    builder = open_builder(cfg.builder, cfg.data_dir, download=cfg.download)
    return TFDSSource(builder, dataset=cfg.builder, used_splits=(cfg.train_split, cfg.eval_split),
                      image_key=cfg.image_key, label_key=cfg.label_key, image_size=cfg.image_size,
                      mean=list(cfg.mean) or None, std=list(cfg.std) or None, cache=cfg.cache)


def labelled_array_plan(
    arrays: Mapping[str, tuple[np.ndarray, np.ndarray]], *, image_shape: tuple[int, int, int],
    class_names: Sequence[str], description: str,
) -> Plan:
    """A :class:`Plan` for in-memory uint8 images + integer labels per split (encoded as PNG bytes).

    Records the train split's pixel mean/std (images scaled to [0, 1]) as metadata for normalization.
    """
    train = arrays["train"][0] / 255.0 if len(arrays.get("train", ((),))[0]) else np.zeros(1)

    def examples(name: str):
        images, labels = arrays[name]
        return lambda: ({"image": png_bytes(x), "label": int(y)} for x, y in zip(images, labels, strict=True))

    return Plan(
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=image_shape),
                                             "label": tfds.features.ClassLabel(names=list(class_names))}),
        splits={name: examples(name) for name in arrays},
        description=description,
        metadata={"mean": [float(train.mean())], "std": [float(train.std())]},
    )
