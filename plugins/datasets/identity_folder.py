"""``identity_folder``: images of people (or any identities) in one folder per identity, split by identity,
with the verification pairs of LFW's ``pairs.txt``.

Layout ``path/<identity>/*`` (any format PIL reads, PGM included: the ORL faces). Two protocols:

- open set (default): ``held_out`` identities (or ``held_out_fraction`` of them), drawn with ``split_seed``, are
  the ``test`` split and never trained on; the ``train`` split holds every image of the others. With a
  ``pairs`` file, the identities it names are the held-out ones.
- closed set (``closed_set=true``): every identity trains; ``test_fraction`` of each identity's images (seeded)
  are the ``test`` split, for identification accuracy.

Examples: ``image``, ``identity`` (index among all identities, natural order of the folder names) and
``label`` (index among the *training* identities, the classes a margin-softmax objective learns; absent from
the open-set ``test`` split, whose identities are no class). ``info.num_classes`` counts the training
identities.

The ``pairs`` split: one example per pair, ``image`` and ``image2`` (uint8), ``same`` (1: same identity) and
``fold`` (the LFW set the pair belongs to). Pairs come from ``pairs`` (LFW's format: a header ``SETS N`` or
``N``, then per set N same-identity lines ``name n1 n2`` and N different-identity lines ``name1 n1 name2 n2``;
``n`` is the n-th image of that folder in natural order, 1-based, which is LFW's ``name_000n.jpg``), or are
generated with ``pair_seed`` over the ``test`` split: ``pair_folds`` sets of ``pairs_per_fold`` same and as
many different pairs, drawn without repetition, then written in that format beside the prepared data (its
path is logged). Bad lines, a pair naming an image that does not exist, and an identity with a single image
when same pairs must be drawn are one-line errors naming the file and line or the folder.

Prepared once as a TFDS array_record dataset like ``image_folder`` (images stored as they are, resized when
read); the split and the pairs file's identities are part of the prepared data's identity.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
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
    image_files,
    image_paths,
    natural_key,
    stratified_test_mask,
)
from prism.plugins.datasets._parallel_read import encoded_images, headers
from prism.plugins.datasets.tfds_source import (
    STACKED_DIR,
    CachedSplit,
    MappedSplit,
    Plan,
    TFDSSource,
    fit_image,
    load_or_prepare,
)

log = logging.getLogger("prism")

VERSION = "1.0.0"
PAIRS_SPLIT = "pairs"


@dataclass
class IdentityFolderConfig(FolderConfig):
    """One folder of images per identity (see :class:`FolderConfig` for the shared fields).

    held_out: identities held out as the ``test`` split (open set); 0: ``held_out_fraction`` of them.
    held_out_fraction: share of the identities held out when ``held_out`` is 0 (at least one).
    closed_set: train on every identity and hold out ``test_fraction`` of each one's images instead.
    min_images: leave out identities with fewer images (LFW's usual 2 for people with a same pair).
    pairs: an LFW-format pairs file (its identities become the held-out ones in the open set); '' generates them.
    pair_folds / pairs_per_fold: generated pairs: this many sets of that many same and as many different pairs.
    pair_seed: seed of the generated pairs.
    eval_split: ``pairs`` (verification), ``test`` (the held-out images) or any TFDS spec of ``train``/``test``.
    """

    held_out: int = field(default=0, metadata={"ge": 0})
    held_out_fraction: float = field(default=0.25, metadata={"gt": 0, "lt": 1})
    closed_set: bool = False
    min_images: int = field(default=1, metadata={"ge": 1})
    pairs: str = ""
    pair_folds: int = field(default=10, metadata={"ge": 1})
    pairs_per_fold: int = field(default=30, metadata={"ge": 1})
    pair_seed: int = field(default=0, metadata={"ge": 0})
    eval_split: str = PAIRS_SPLIT


# -- pairs files (LFW format) ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """Two images named as LFW does, by identity and 1-based image number; ``line`` in the file (0: generated)."""

    name1: str
    number1: int
    name2: str
    number2: int
    fold: int
    line: int = 0

    @property
    def same(self) -> bool:
        return self.name1 == self.name2


def _positive_int(text: str, path: Path, line: int, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{path} line {line}: {what} must be a positive whole number, got {text!r}")
    return int(text)


def read_pairs(path: str | Path) -> list[Pair]:
    """The pairs of an LFW-format file: header ``SETS N`` (or ``N``: one set), then per set N lines
    ``name n1 n2`` (same identity) and N lines ``name1 n1 name2 n2`` (different identities)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"dataset.pairs={str(path)!r}: cannot read it ({exc.strerror or exc})") from None
    numbered = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise DataError(f"{path}: empty pairs file (expected a header 'SETS PAIRS_PER_SET', e.g. '10 300')")
    header_line, header = numbered[0]
    if len(header) not in (1, 2) or not all(t.isdigit() and int(t) > 0 for t in header):
        raise DataError(f"{path} line {header_line}: expected the header 'SETS PAIRS_PER_SET' (e.g. '10 300') or "
                        f"'PAIRS_PER_SET', got {' '.join(header)!r}")
    sets, per_set = (1, int(header[0])) if len(header) == 1 else (int(header[0]), int(header[1]))
    body = numbered[1:]
    if len(body) != sets * 2 * per_set:
        raise DataError(f"{path}: the header (line {header_line}) announces {sets} set(s) of {per_set} same + "
                        f"{per_set} different pairs ({sets * 2 * per_set} lines), the file has {len(body)} pair lines")
    pairs = []
    for i, (line, fields) in enumerate(body):
        fold, same = divmod(i, 2 * per_set)[0], i % (2 * per_set) < per_set
        want = "'name n1 n2' (a same-identity pair)" if same else "'name1 n1 name2 n2' (a different-identity pair)"
        if len(fields) != (3 if same else 4):
            raise DataError(f"{path} line {line}: expected {want} at this position of set {fold + 1}, got "
                            f"{' '.join(fields)!r}")
        if same:
            name, a, b = fields
            pair = Pair(name, _positive_int(a, path, line, "an image number"), name,
                        _positive_int(b, path, line, "an image number"), fold, line)
        else:
            name1, a, name2, b = fields
            if name1 == name2:
                raise DataError(f"{path} line {line}: a different-identity pair names {name1!r} twice")
            pair = Pair(name1, _positive_int(a, path, line, "an image number"), name2,
                        _positive_int(b, path, line, "an image number"), fold, line)
        pairs.append(pair)
    return pairs


def write_pairs(path: str | Path, pairs: Sequence[Pair]) -> Path:
    """Write ``pairs`` in LFW's format (every fold must hold the same number N of same and of different pairs;
    within a fold, same pairs first); returns the path."""
    folds = sorted({p.fold for p in pairs})
    if folds != list(range(len(folds))):
        raise ValueError(f"pair folds must be 0..K-1, got {folds}")
    per_fold = [([p for p in pairs if p.fold == f and p.same], [p for p in pairs if p.fold == f and not p.same])
                for f in folds]
    sizes = {len(s) for fold in per_fold for s in fold}
    if len(sizes) != 1:
        raise ValueError("every fold must hold the same number of same and of different pairs")
    lines = [f"{len(folds)}\t{sizes.pop()}"]
    for same, different in per_fold:
        lines += [f"{p.name1}\t{p.number1}\t{p.number2}" for p in same]
        lines += [f"{p.name1}\t{p.number1}\t{p.name2}\t{p.number2}" for p in different]
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
    return path


def generate_pairs(images: Mapping[str, Sequence[int]], *, folds: int, per_fold: int, seed: int,
                   folder_of: Mapping[str, Path] | None = None, split: str = "test") -> list[Pair]:
    """``folds`` sets of ``per_fold`` same and ``per_fold`` different pairs over ``images`` (identity -> its image
    numbers), drawn without repetition with ``seed``. Every identity needs two images (a same pair is possible)."""
    for name, numbers in images.items():
        if len(numbers) < 2:
            where = str(folder_of[name]) if folder_of else name
            raise DataError(f"identity {where} has {len(numbers)} image in split {split!r}: no same-identity pair "
                            f"can be drawn from it; give it more images, leave it out with dataset.min_images=2, "
                            f"or give the pairs in dataset.pairs")
    names = sorted(images, key=natural_key)
    if len(names) < 2:
        raise DataError(f"generating pairs needs at least 2 identities in split {split!r}, it has {len(names)}")
    rng = np.random.default_rng(seed)
    need = folds * per_fold
    same = [(n, a, n, b) for n in names for i, a in enumerate(images[n]) for b in images[n][i + 1:]]
    if len(same) < need:
        raise DataError(f"only {len(same)} same-identity pairs exist among the {len(names)} identities of split "
                        f"{split!r}, {need} wanted ({folds} folds x {per_fold}); lower dataset.pairs_per_fold to at "
                        f"most {len(same) // folds}")
    same = [same[i] for i in rng.choice(len(same), need, replace=False)]
    flat = [(n, k) for n in names for k in images[n]]
    total_different = len(flat) * (len(flat) - 1) // 2 - sum(len(images[n]) * (len(images[n]) - 1) // 2 for n in names)
    if total_different < need:
        raise DataError(f"only {total_different} different-identity pairs exist in split {split!r}, {need} wanted; "
                        f"lower dataset.pairs_per_fold")
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < need:
        i, j = (int(v) for v in rng.integers(0, len(flat), 2))
        if flat[i][0] != flat[j][0] and (min(i, j), max(i, j)) not in chosen:
            chosen.add((min(i, j), max(i, j)))
    different = [(*flat[i], *flat[j]) for i, j in sorted(chosen)]
    different = [different[i] for i in rng.permutation(len(different))]
    pairs = []
    for f in range(folds):
        for group in (same, different):
            pairs += [Pair(a, b, c, d, f) for a, b, c, d in group[f * per_fold:(f + 1) * per_fold]]
    return pairs


# -- scanning the folder ---------------------------------------------------------------------------------
def identity_listing(root: Path, min_images: int) -> dict[str, list[Path]]:
    """``identity -> its image files in natural order`` for every identity folder with >= ``min_images``."""
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if not folders:
        raise DataError(f"{root}: no identity sub-folders; expected one folder of images per identity")
    listing = {d.name: image_files(d) for d in folders}
    empty = [str(root / name) for name, files in listing.items() if not files]
    if empty:
        raise DataError(f"identity folder {empty[0]} is empty: it has no images (.jpg, .png, .pgm, ...)")
    kept = {name: files for name, files in listing.items() if len(files) >= min_images}
    if len(kept) < 2:
        raise DataError(f"{root}: {len(kept)} identity folder(s) with at least dataset.min_images={min_images} "
                        f"images; at least 2 are needed")
    return kept


def check_pairs(pairs: Sequence[Pair], listing: Mapping[str, Sequence[Path]], root: Path, pairs_path: Path) -> None:
    """Each pair names an identity folder of ``root`` and an image number it has, or a DataError naming the line."""
    for p in pairs:
        for name, number in ((p.name1, p.number1), (p.name2, p.number2)):
            if name not in listing:
                raise DataError(f"{pairs_path} line {p.line}: no identity folder {name!r} in {root} (or it has fewer "
                                f"than dataset.min_images images)")
            if number > len(listing[name]):
                raise DataError(f"{pairs_path} line {p.line}: image {number} of {name!r} does not exist: "
                                f"{root / name} has {len(listing[name])} image(s)")


def held_out_identities(names: Sequence[str], cfg: IdentityFolderConfig, pairs: Sequence[Pair] | None) -> list[str]:
    """The open-set test identities: those the pairs name, else ``held_out`` (or the fraction) drawn at random."""
    if pairs is not None:
        named = {p.name1 for p in pairs} | {p.name2 for p in pairs}
        return [n for n in names if n in named]
    count = cfg.held_out or max(1, int(round(len(names) * cfg.held_out_fraction)))
    if count >= len(names):
        raise ConfigError(f"dataset.held_out={count} identities of {len(names)} leaves none to train on")
    chosen = np.random.default_rng(cfg.split_seed).permutation(len(names))[:count]
    return [names[i] for i in sorted(chosen)]


def scan(root: Path, cfg: IdentityFolderConfig, listing: Mapping[str, list[Path]], pairs: Sequence[Pair] | None,
         corrupt: CorruptImages) -> Plan:
    """Assign the splits (by identity, or by image in the closed set) and describe the dataset to write."""
    names = list(listing)
    items = [(path, names.index(name), number) for name, files in listing.items()
             for number, path in enumerate(files, start=1)]
    shapes: set[tuple[int, int]] = set()
    kept = []
    for item, (ok, header) in zip(items, headers([p for p, _, _ in items]), strict=True):
        if ok:
            shapes.add(header[0])
            kept.append(item)
        else:
            corrupt.handle(item[0], header)
    if cfg.closed_set:
        test = stratified_test_mask([ident for _, ident, _ in kept], cfg.test_fraction, cfg.split_seed)
        train_names = names
    else:
        held = set(held_out_identities(names, cfg, pairs))
        test = np.array([names[ident] in held for _, ident, _ in kept], bool)
        train_names = [n for n in names if n not in held]
    splits = {"train": [x for x, t in zip(kept, test, strict=True) if not t],
              "test": [x for x, t in zip(kept, test, strict=True) if t]}

    def examples(split_items: list[tuple[Path, int, int]]):
        def generate():
            read = encoded_images([p for p, _, _ in split_items], cfg.channels)
            for (path, ident, number), (ok, value) in zip(split_items, read, strict=True):
                if not ok:
                    corrupt.handle(path, value)
                    continue
                yield {"image": value[0], "identity": ident, "number": number,
                       "filename": str(path.relative_to(root))}
        return generate

    height, width = shapes.pop() if len(shapes) == 1 else (None, None)
    return Plan(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(height, width, cfg.channels)),
            "identity": tfds.features.ClassLabel(names=names),
            "number": tfds.features.Scalar(dtype=np.int32),
            "filename": tfds.features.Text(),
        }),
        splits={split: examples(x) for split, x in splits.items() if x},
        description=f"identity folder {root}",
        metadata={"identities": names, "train_identities": train_names, "open_set": not cfg.closed_set,
                  "index": {split: [[ident, number] for _, ident, number in x] for split, x in splits.items()}},
    )


# -- reading ---------------------------------------------------------------------------------------------
class IdentityExample:
    """TFDS example -> ``image``, ``identity`` and (for splits of training identities) ``label`` (picklable)."""

    def __init__(self, size: tuple[int, int] | None, labels: np.ndarray, with_label: bool) -> None:
        self.size, self.labels, self.with_label = size, labels, with_label

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        identity = int(example["identity"])
        out = {"image": fit_image(np.asarray(example["image"]), self.size), "identity": np.int32(identity)}
        if self.with_label:
            out["label"] = np.int32(self.labels[identity])
        return out

    def cache_key(self) -> str:
        size = "x".join(map(str, self.size)) if self.size else "stored"
        return f"identity-{size}-{'label' if self.with_label else 'nolabel'}"


class PairSplit(Sequence):
    """The verification pairs as examples: both images, ``same`` and ``fold``, read from the identity splits."""

    def __init__(self, splits: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
                 where: Sequence[tuple[tuple[str, int], tuple[str, int]]], pairs: Sequence[Pair]) -> None:
        self.splits, self.where, self.pairs = splits, list(where), list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} pairs")
        (split1, i1), (split2, i2) = self.where[index]
        pair = self.pairs[index]
        return {"image": self.splits[split1][i1]["image"], "image2": self.splits[split2][i2]["image"],
                "same": np.int32(pair.same), "fold": np.int32(pair.fold)}


class IdentitySource(TFDSSource):
    """The prepared identity folder: ``train``/``test`` (and their TFDS slices) plus the ``pairs`` split."""

    def __init__(self, builder: tfds.core.DatasetBuilder, cfg: IdentityFolderConfig, root: Path,
                 pairs: list[Pair] | None) -> None:
        meta = builder.info.metadata
        self.identities = list(meta["identities"])
        self.train_identities = list(meta["train_identities"])
        self.open_set = bool(meta["open_set"])
        self.labels = np.full(len(self.identities), -1, np.int32)
        for label, name in enumerate(self.train_identities):
            self.labels[self.identities.index(name)] = label
        self.root, self.cfg = root, cfg
        self.pairs_file: Path | None = Path(cfg.pairs).expanduser() if cfg.pairs else None
        self._pairs, self._pair_index = pairs, None
        super().__init__(builder, dataset=f"identity_folder ({root})", used_splits=(cfg.train_split, cfg.eval_split),
                         image_size=cfg.image_size, mean=list(cfg.mean) or None, std=list(cfg.std) or None,
                         num_classes=len(self.train_identities), class_names=self.train_identities, cache=cfg.cache)

    @property
    def pairs(self) -> list[Pair]:
        """The verification pairs: the ``pairs`` file's, else generated (once, when first asked for)."""
        if self._pairs is None:
            self._pairs = self._generate(self.builder, self.builder.info.metadata)
        return self._pairs

    @property
    def pair_index(self) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        """Each pair's two images as ``(split, position)`` in the prepared splits."""
        if self._pair_index is None:
            self._pair_index = self._locate(self.builder.info.metadata)
        return self._pair_index

    def _generate(self, builder: tfds.core.DatasetBuilder, meta: Mapping[str, Any]) -> list[Pair]:
        images: dict[str, list[int]] = {}
        for ident, number in meta["index"].get("test", []):
            images.setdefault(self.identities[ident], []).append(number)
        cfg = self.cfg
        pairs = generate_pairs(images, folds=cfg.pair_folds, per_fold=cfg.pairs_per_fold, seed=cfg.pair_seed,
                               folder_of={n: self.root / n for n in images})
        path = Path(str(builder.data_dir)) / f"pairs-seed{cfg.pair_seed}-{cfg.pair_folds}x{cfg.pairs_per_fold}.txt"
        try:
            if not path.is_file():
                write_pairs(path, pairs)
            self.pairs_file = path
            log.info("identity_folder: %d generated pairs (%d folds) over the %d test identities, in %s",
                     len(pairs), cfg.pair_folds, len(images), path)
        except OSError as exc:  # a read-only data directory only costs the written copy
            log.info("identity_folder: generated pairs not written to %s: %s", path, exc)
        return pairs

    def _locate(self, meta: Mapping[str, Any]) -> list[tuple[tuple[str, int], tuple[str, int]]]:
        position = {(self.identities[ident], number): (split, i)
                    for split, rows in meta["index"].items() for i, (ident, number) in enumerate(rows)}
        where = []
        for p in self.pairs:
            both = []
            for name, number in ((p.name1, p.number1), (p.name2, p.number2)):
                if (name, number) not in position:
                    raise DataError(f"{self.pairs_file} line {p.line}: image {number} of {name!r} was not prepared "
                                    f"(a corrupt file skipped by dataset.on_corrupt=skip)")
                both.append(position[(name, number)])
            where.append(tuple(both))
        return where

    def _split_size(self, name: str) -> int:
        return len(self.pairs) if name == PAIRS_SPLIT else super()._split_size(name)

    def split(self, name: str) -> Sequence[dict[str, np.ndarray]]:
        """``pairs``, or any TFDS spec of ``train``/``test`` as identity examples."""
        if name in self._splits:
            return self._splits[name]
        if name == PAIRS_SPLIT:
            splits = {s: self.split(s) for s in {s for pair in self.pair_index for s, _ in pair}}
            self._splits[name] = PairSplit(splits, self.pair_index, self.pairs)
            return self._splits[name]
        self._split_size(name)  # validates the name
        with_label = not (self.open_set and name.split("[")[0].strip() == "test")
        convert = IdentityExample(self.resize_to, self.labels, with_label)
        split: Sequence = MappedSplit(self.builder.as_data_source(split=name), convert,
                                      self._decoded_dir(name, convert))
        self._splits[name] = CachedSplit(split) if self.cache else split
        return self._splits[name]

    def _decoded_dir(self, name: str, convert: IdentityExample) -> Path:
        """Where split ``name``'s decoded copy lives (see ``MappedSplit.stacked``)."""
        spec = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
        spec += "-" + hashlib.sha1(name.encode()).hexdigest()[:8]
        return Path(str(self.builder.data_dir)) / STACKED_DIR / f"{spec}-{convert.cache_key()}"


@DATASETS.register("identity_folder", config=IdentityFolderConfig,
                   description="One folder per identity (faces), split by identity; LFW-format verification pairs.")
def build_identity_folder(cfg: IdentityFolderConfig) -> IdentitySource:
    root = check_folder_config(cfg, "identity_folder")
    if cfg.closed_set and not 0 < cfg.test_fraction < 1:
        raise ConfigError(f"dataset.test_fraction must be in (0, 1) with dataset.closed_set=true, got "
                          f"{cfg.test_fraction}")
    listing = identity_listing(root, cfg.min_images)
    pairs = None
    if cfg.pairs:
        pairs_path = Path(cfg.pairs).expanduser()
        pairs = read_pairs(pairs_path)
        check_pairs(pairs, listing, root, pairs_path)
    options = {"channels": cfg.channels, "closed_set": cfg.closed_set, "split_seed": cfg.split_seed,
               "on_corrupt": cfg.on_corrupt, "min_images": cfg.min_images,
               **({"test_fraction": cfg.test_fraction} if cfg.closed_set else
                  {"held_out": cfg.held_out, "held_out_fraction": cfg.held_out_fraction}),
               "pair_identities": sorted({p.name1 for p in pairs} | {p.name2 for p in pairs}) if pairs else None}
    corrupt = CorruptImages(cfg.on_corrupt, "identity_folder")
    identity = folder_identity(root, image_paths(str(root)), options)
    builder, prepared_now = load_or_prepare("identity_folder", identity, data_dir=cfg.data_dir, version=VERSION,
                                            make_plan=lambda: scan(root, cfg, listing, pairs, corrupt))
    if prepared_now:
        corrupt.report()
    return IdentitySource(builder, cfg, root, pairs)
