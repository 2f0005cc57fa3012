"""Dataset plugins: each one really prepares array_record files (in temporary data dirs) and is read back
through TFDS data sources, compared pixel for pixel with its source files decoded by PIL/NumPy.

Real data: scikit-learn's digits, Fashion-MNIST (Debian package), and ``../shared/data`` (raccoon VOC,
ISBI 2012 membranes); tests needing a folder that is absent skip with the reason.
"""

from __future__ import annotations

import csv
import gzip
import logging
import pickle
import shutil
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RACCOON = SHARED_DATA / "raccoon"
ISBI = SHARED_DATA / "isbi2012_membrane" / "data" / "membrane" / "train"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def build(name: str, **fields):
    return DATASETS.build(name, DATASETS.get(name).config(**fields))


def examples(split) -> list[dict]:
    return [split[i] for i in range(len(split))]


def variants(data_dir: Path, name: str) -> list[Path]:
    """Prepared variant directories (``name/<identity>/<version>``) in ``data_dir``."""
    return sorted(p.parent for p in (data_dir / name).glob("*/*/dataset_info.json"))


def raw_split(source, split: str):
    """The TFDS data source under a prism source (to read its ``filename`` feature)."""
    return source.builder.as_data_source(split=split)


def resized(array: np.ndarray, size: tuple[int, int], resample=Image.Resampling.BILINEAR) -> np.ndarray:
    channels = array.shape[-1]
    out = Image.fromarray(array[..., 0] if channels == 1 else array).resize(size[::-1], resample)
    return np.asarray(out).reshape(*size, channels)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One prepared-data directory for the session: each dataset is prepared once and shared by tests."""
    return tmp_path_factory.mktemp("tfds_data")


@pytest.fixture(scope="session")
def digits(data_dir):
    return build("digits", data_dir=str(data_dir))


# -- digits -----------------------------------------------------------------------------------------
def test_digits_are_sklearns_images_in_a_stratified_split(digits, data_dir):
    from prism.plugins.datasets.digits import split_digits

    expected = split_digits(0.2, 0)
    info = digits.info
    assert info.splits == {"train": 1437, "test": 360}
    assert info.num_classes == 10 and info.image_shape == (8, 8, 1) and info.class_names == tuple("0123456789")
    for name, (images, labels) in expected.items():
        got = examples(digits.split(name))
        np.testing.assert_array_equal(np.stack([e["image"] for e in got]), images)
        np.testing.assert_array_equal(np.array([e["label"] for e in got]), labels)
        assert got[0]["image"].dtype == np.uint8 and got[0]["label"].dtype == np.int32
    assert np.all(np.bincount(expected["test"][1], minlength=10) >= 35)  # ~20% of each class
    np.testing.assert_allclose(info.mean, [expected["train"][0].mean() / 255], rtol=1e-6)
    np.testing.assert_allclose(info.std, [expected["train"][0].std() / 255], rtol=1e-6)
    (variant,) = variants(data_dir, "digits")
    assert sorted(p.name for p in variant.glob("*.array_record*")) == [
        "digits-test.array_record-00000-of-00001", "digits-train.array_record-00000-of-00001"]
    with pytest.raises(ConfigError, match="no split 'validation'"):
        digits.split("validation")


def test_digits_prepare_once_and_a_new_identity_per_split(digits, data_dir, monkeypatch):
    import prism.plugins.datasets.digits as module

    def fail(*args):
        raise AssertionError("prepared again")

    with monkeypatch.context() as m:
        m.setattr(module, "digits_plan", fail)
        again = build("digits", data_dir=str(data_dir))  # reuses the prepared files
    np.testing.assert_array_equal(again.split("test")[7]["image"], digits.split("test")[7]["image"])
    other = build("digits", data_dir=str(data_dir), split_seed=1, cache=False)
    assert len(variants(data_dir, "digits")) == 2
    assert other.info.splits == digits.info.splits
    assert not all(np.array_equal(other.split("test")[i]["image"], digits.split("test")[i]["image"])
                   for i in range(20))


def test_digits_uncached_reads_the_same_examples(digits, data_dir):
    from prism.plugins.datasets.tfds_source import CachedSplit, MappedSplit

    uncached = build("digits", data_dir=str(data_dir), cache=False)
    assert isinstance(uncached.split("train"), MappedSplit) and isinstance(digits.split("train"), CachedSplit)
    for i in (0, 500, 1436, -1):
        a, b = uncached.split("train")[i], digits.split("train")[i]
        assert a.keys() == b.keys() == {"image", "label"}
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"] == b["label"]
    with pytest.raises(IndexError):
        uncached.split("test")[360]


def test_digits_rejects_a_bad_fraction_before_preparing(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.test_fraction must be in \(0, 1\), got 1.5"):
        build("digits", test_fraction=1.5, data_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_split_pickles_for_grain_workers_and_feeds_grain(digits, data_dir):
    from prism.framework.data import train_iterator
    from prism.framework.parallel import HostSlice

    split = build("digits", data_dir=str(data_dir), cache=False).split("test")
    clone = pickle.loads(pickle.dumps(split))
    np.testing.assert_array_equal(clone[3]["image"], split[3]["image"])
    batch = next(train_iterator(split, global_batch=16, host=HostSlice(0, 1, 16), seed=0, threads=2))
    assert batch["image"].shape == (16, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32


# -- tfds (any prepared builder) --------------------------------------------------------------------
def test_tfds_reads_a_prepared_builder_with_split_slicing(tmp_path):
    reference = build("digits", data_dir=str(tmp_path), cache=False)
    source = build("tfds", builder="digits", data_dir=str(tmp_path), train_split="train[:50%]")
    half = len(source.split("train[:50%]"))
    assert half in (718, 719) and source.info.splits == {"train[:50%]": half, "test": 360}
    assert len(source.split("train[50%:]")) == 1437 - half
    assert source.info.num_classes == 10 and source.info.class_names == tuple("0123456789")
    assert source.info.mean is None  # not normalized unless dataset.mean/std are given
    for i in (0, half - 1):
        np.testing.assert_array_equal(source.split("train[:50%]")[i]["image"], reference.split("train")[i]["image"])
    np.testing.assert_array_equal(source.split("train[50%:]")[0]["image"], reference.split("train")[half]["image"])

    big = build("tfds", builder="digits", data_dir=str(tmp_path), image_size=[16, 12], mean=[0.5], std=[0.25])
    assert big.info.image_shape == (16, 12, 1) and big.info.mean == (0.5,) and big.info.std == (0.25,)
    np.testing.assert_array_equal(big.split("test")[5]["image"], resized(reference.split("test")[5]["image"], (16, 12)))

    (variant,) = variants(tmp_path, "digits")
    shutil.copytree(variant.parent, variant.parent.with_name("copy_of_it"))
    with pytest.raises(DataError, match=r"several prepared variants.*digits/copy_of_it"):
        build("tfds", builder="digits", data_dir=str(tmp_path))
    named = build("tfds", builder=f"digits/{variant.parent.name}", data_dir=str(tmp_path))
    assert named.info.splits == {"train": 1437, "test": 360}
    with pytest.raises(ConfigError, match="no image feature 'picture'"):
        build("tfds", builder=f"digits/{variant.parent.name}", data_dir=str(tmp_path), image_key="picture")
    with pytest.raises(ConfigError, match="no split 'validation'"):
        build("tfds", builder=f"digits/{variant.parent.name}", data_dir=str(tmp_path), eval_split="validation")


def test_tfds_unprepared_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(DataError) as err:
        build("tfds", builder="mnist", data_dir=str(tmp_path))
    message = str(err.value)
    assert "'mnist' is not prepared in " + str(tmp_path) in message
    assert "tfds.builder('mnist', data_dir=" in message and "file_format='array_record'" in message
    assert "download_and_prepare()" in message and "pip install tensorflow" in message
    with pytest.raises(DataError, match="no such TFDS catalog dataset, and nothing prepared"):
        build("tfds", builder="no_such_dataset_xyz", data_dir=str(tmp_path))


# -- fashion_mnist_local ----------------------------------------------------------------------------
def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_prepares_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for split, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels)
        expected[split] = (images, labels)
    source = build("fashion_mnist_local", path=str(tmp_path), data_dir=str(tmp_path / "data"))
    assert source.info.splits == {"train": 12, "test": 5}
    for i in range(5):
        ex = source.split("test")[i]
        np.testing.assert_array_equal(ex["image"][..., 0], expected["t10k"][0][i])
        assert ex["label"] == expected["t10k"][1][i]
    assert source.info.mean == pytest.approx((expected["train"][0].mean() / 255,))


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"{FASHION} absent: apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_real_images(tmp_path):
    from prism.plugins.datasets.fashion_mnist_local import CLASS_NAMES, FILES, read_idx

    real = {split: (read_idx(FASHION / images), read_idx(FASHION / labels)) for split, (images, labels)
            in FILES.items()}
    assert real["train"][0].shape == (60000, 28, 28) and real["test"][0].shape == (10000, 28, 28)
    # A real subset (preparing all 70k images takes ~20 s): the first 300 / 100 images of each split.
    for split, prefix, n in (("train", "train", 300), ("test", "t10k", 100)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", real[split][0][:n])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", real[split][1][:n])
    source = build("fashion_mnist_local", path=str(tmp_path), data_dir=str(tmp_path / "data"))
    assert source.info.class_names == CLASS_NAMES and source.info.image_shape == (28, 28, 1)
    got = examples(source.split("test"))
    np.testing.assert_array_equal(np.stack([e["image"][..., 0] for e in got]), real["test"][0][:100])
    np.testing.assert_array_equal([e["label"] for e in got], real["test"][1][:100])


def test_fashion_mnist_missing_path_names_it(tmp_path):
    cfg = DATASETS.get("fashion_mnist_local").config(path=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"dataset.path=.*nowhere.*apt-get install -y dataset-fashion-mnist"):
        DATASETS.build("fashion_mnist_local", cfg)


def test_truncated_idx_file_is_reported(tmp_path):
    from prism.plugins.datasets.fashion_mnist_local import read_idx

    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_cli_missing_data_path_is_one_clear_message(tmp_path):
    from conftest import REPO, run_prism

    proc = run_prism("train", "dataset=fashion_mnist_local", f"dataset.path={tmp_path}/absent",
                     f"hydra.run.dir={tmp_path}/run", cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "prism: error: dataset.path=" in proc.stderr and "absent" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- image_folder -----------------------------------------------------------------------------------
def _image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    """A real-looking (smooth + noise) image of ``size`` (H, W) saved by PIL in the format of ``path``."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 50, w))[..., None] + rng.integers(0, 50, (h, w, 3))
    array = base.clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path)


def _class_tree(root: Path, sizes=None) -> dict[str, int]:
    counts = {"cat": 10, "dog": 6, "bird": 5}
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            size = sizes or (20 + i, 30 - c)
            if name == "dog":
                _image(root / name / f"{i}.jpg", size, seed=100 * c + i)
            else:
                _image(root / name / f"{i}.png", size, mode="L" if name == "bird" else "RGB", seed=100 * c + i)
    return counts


def test_image_folder_stratified_split_resized_pixel_for_pixel(tmp_path, data_dir):
    root = tmp_path / "pets"
    _class_tree(root)
    (root / "cat" / "notes.txt").write_text("not an image")  # ignored
    source = build("image_folder", path=str(root), image_size=[16, 16], data_dir=str(data_dir))
    info = source.info
    assert info.class_names == ("bird", "cat", "dog") and info.num_classes == 3
    assert info.image_shape == (16, 16, 3)
    # round(20% of 5, 10, 6) = 1, 2, 1 held out per class
    assert info.splits == {"train": 17, "test": 4}
    seen = []
    for split in ("train", "test"):
        raw = raw_split(source, split)
        got = examples(source.split(split))
        labels = [e["label"] for e in got]
        assert np.bincount(labels, minlength=3).tolist() == ([4, 8, 5] if split == "train" else [1, 2, 1])
        for ex, raw_ex in zip(got, (raw[i] for i in range(len(raw))), strict=True):
            path = root / raw_ex["filename"].decode()
            assert info.class_names[ex["label"]] == path.parent.name
            decoded = np.asarray(Image.open(path).convert("RGB"))
            np.testing.assert_array_equal(raw_ex["image"], decoded)  # stored losslessly (JPEG bytes kept as is)
            np.testing.assert_array_equal(ex["image"], resized(decoded, (16, 16)))
            seen.append(path)
    assert sorted(seen) == sorted(p for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def test_image_folder_train_test_folders_and_fixed_size(tmp_path, data_dir):
    root = tmp_path / "given"
    _class_tree(root / "train", sizes=(12, 10))
    for name in ("bird", "cat", "dog"):
        _image(root / "test" / name / "t.png", (12, 10), seed=7)
    source = build("image_folder", path=str(root), channels=1, data_dir=str(data_dir))  # no image_size needed
    assert source.info.splits == {"train": 21, "test": 3} and source.info.image_shape == (12, 10, 1)
    ex = source.split("test")[1]
    assert ex["label"] == 1  # cat
    expected = np.asarray(Image.open(root / "test" / "cat" / "t.png").convert("L"))[..., None]
    np.testing.assert_array_equal(ex["image"], expected)
    _image(root / "test" / "horse" / "h.png", (12, 10))
    with pytest.raises(DataError, match=r"class folder .*test/horse has no counterpart .*label out of range"):
        build("image_folder", path=str(root), data_dir=str(data_dir))


def test_image_folder_needs_image_size_when_sizes_vary(tmp_path, data_dir):
    root = tmp_path / "varied"
    for i in range(3):
        _image(root / "a" / f"{i}.png", (10 + i, 12))
        _image(root / "b" / f"{i}.png", (10, 12))
    with pytest.raises(DataError, match=r"images vary in size; set dataset.image_size"):
        build("image_folder", path=str(root), data_dir=str(data_dir))
    n_variants = len(variants(data_dir, "image_folder"))
    ok = build("image_folder", path=str(root), data_dir=str(data_dir), image_size=[8, 8])
    assert ok.info.image_shape == (8, 8, 3)
    assert len(variants(data_dir, "image_folder")) == n_variants  # image_size is applied when reading


def test_image_folder_bad_folders_name_the_path(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"dataset.path='.*/absent': no such directory"):
        build("image_folder", path=str(tmp_path / "absent"), data_dir=str(data_dir))
    root = tmp_path / "some_empty"
    _image(root / "full" / "1.png", (8, 8))
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*some_empty/empty is empty"):
        build("image_folder", path=str(root), data_dir=str(data_dir))
    flat = tmp_path / "flat"
    _image(flat / "1.png", (8, 8))
    with pytest.raises(DataError, match=r"flat: no class sub-folders"):
        build("image_folder", path=str(flat), data_dir=str(data_dir))
    with pytest.raises(ConfigError, match="dataset.on_corrupt must be 'skip' or 'fail'"):
        build("image_folder", path=str(flat), on_corrupt="ignore")


def _corrupt_files(root: Path) -> list[Path]:
    truncated = root / "dog" / "truncated.jpg"
    _image(truncated, (9, 9))
    truncated.write_bytes(truncated.read_bytes()[:-40])  # header intact, scan data cut
    garbage = root / "cat" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    return [garbage, truncated]


def test_image_folder_corrupt_images_skipped_with_a_count_or_fatal(tmp_path, data_dir, caplog):
    root = tmp_path / "with_corrupt"
    counts = _class_tree(root, sizes=(9, 9))
    bad = _corrupt_files(root)
    with pytest.raises(DataError, match=r"corrupt image .*garbage.png.*on_corrupt=skip"):
        build("image_folder", path=str(root), on_corrupt="fail", data_dir=str(data_dir))
    with caplog.at_level(logging.WARNING, logger="prism"):
        source = build("image_folder", path=str(root), data_dir=str(data_dir))
    assert sum(source.info.splits.values()) == sum(counts.values())
    (warning,) = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert "skipped 2 corrupt images: " in warning and all(str(p) in warning for p in bad)


def test_folder_identity_separates_folders_and_follows_changes(tmp_path, monkeypatch):
    import prism.plugins.datasets.image_folder as module

    data = tmp_path / "data"
    for seed, name in enumerate(("one", "two")):
        _image(tmp_path / name / "x" / "1.png", (6, 6), seed=seed)
        _image(tmp_path / name / "y" / "1.png", (6, 6), seed=3)
    kw = {"test_fraction": 0.0, "eval_split": "train", "data_dir": str(data)}
    one = build("image_folder", path=str(tmp_path / "one"), **kw)
    two = build("image_folder", path=str(tmp_path / "two"), **kw)
    assert len(variants(data, "image_folder")) == 2
    assert not np.array_equal(one.split("train")[0]["image"], two.split("train")[0]["image"])
    with monkeypatch.context() as m:
        m.setattr(module, "scan", lambda *a: pytest.fail("prepared again"))
        build("image_folder", path=str(tmp_path / "one"), image_size=[3, 3], **kw)
    _image(tmp_path / "one" / "y" / "2.png", (6, 6))  # the folder changed: a new variant
    assert build("image_folder", path=str(tmp_path / "one"), **kw).info.splits["train"] == 3
    with pytest.raises(ConfigError, match=r"has no split 'test'; splits: train"):
        build("image_folder", path=str(tmp_path / "one"), test_fraction=0.0, data_dir=str(data))
    assert len(variants(data, "image_folder")) == 3


# -- voc_folder -------------------------------------------------------------------------------------
def _voc_xml(path: Path, image: str, size: tuple[int, int], objects: list[tuple[str, tuple]]) -> None:
    objs = "".join(f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{image}</filename><size><width>{size[1]}</width>"
                    f"<height>{size[0]}</height><depth>3</depth></size>{objs}</annotation>")


def _voc_folder(root: Path, n: int = 5) -> None:
    for i in range(n):
        _image(root / "images" / f"im{i}.jpg", (40, 60), seed=i)
        _voc_xml(root / "annotations" / f"im{i}.xml", f"im{i}.jpg", (40, 60),
                 [("cat", (1, 2, 30, 20)), ("dog", (10, 5, 60, 40))][: 1 + i % 2])


def _xml_boxes(xml: Path) -> tuple[str, np.ndarray, list[str]]:
    root = ET.parse(xml).getroot()
    w, h = (float(root.findtext(f"size/{k}")) for k in ("width", "height"))
    boxes = [[float(o.findtext(f"bndbox/{k}")) / d for k, d in (("ymin", h), ("xmin", w), ("ymax", h), ("xmax", w))]
             for o in root.findall("object")]
    return root.findtext("filename"), np.array(boxes, np.float32).reshape(-1, 4), [
        o.findtext("name") for o in root.findall("object")]


@pytest.mark.skipif(not RACCOON.is_dir(), reason=f"shared data {RACCOON} absent (a fresh clone has no ../shared)")
def test_voc_folder_raccoon_boxes_and_csv_split(data_dir):
    split_names = {}
    for split in ("train", "test"):
        with open(RACCOON / "data" / f"{split}_labels.csv") as f:
            split_names[split] = {row["filename"] for row in csv.DictReader(f)}
    source = build("voc_folder", path=str(RACCOON), train_list="data/train_labels.csv",
                   test_list="data/test_labels.csv", image_size=[96, 128], max_boxes=8, data_dir=str(data_dir))
    info = source.info
    assert info.splits == {"train": len(split_names["train"]), "test": len(split_names["test"])} == {
        "train": 160, "test": 40}
    assert info.class_names == ("raccoon",) and info.num_classes == 1 and info.image_shape == (96, 128, 3)
    xml_by_image = {_xml_boxes(x)[0]: _xml_boxes(x) for x in (RACCOON / "annotations").glob("*.xml")}
    n_boxes = 0
    for split in ("train", "test"):
        raw = raw_split(source, split)
        got = examples(source.split(split))
        names = [raw[i]["filename"].decode() for i in range(len(raw))]
        assert set(names) == split_names[split]
        for name, ex in zip(names, got, strict=True):
            _, boxes, classes = xml_by_image[name]
            k = len(boxes)
            assert ex["boxes"].shape == (8, 4) and ex["box_valid"].tolist() == [True] * k + [False] * (8 - k)
            np.testing.assert_allclose(ex["boxes"][:k], boxes, atol=1e-6)
            assert not ex["boxes"][k:].any() and ex["labels"].tolist() == [0] * 8 and classes == ["raccoon"] * k
            assert ex["image"].shape == (96, 128, 3)
            n_boxes += k
    assert n_boxes == 217
    most = max(len(b) for _, b, _ in xml_by_image.values())
    # Pixels: the stored image is the JPEG itself; what the source returns is its resized decoding.
    name = names[0]
    decoded = np.asarray(Image.open(RACCOON / "images" / name).convert("RGB"))
    np.testing.assert_array_equal(got[0]["image"], resized(decoded, (96, 128)))
    too_many = rf"image raccoon-\d+.jpg has {most} objects but dataset.max_boxes={most - 1}"
    with pytest.raises(ConfigError, match=too_many):
        build("voc_folder", path=str(RACCOON), train_list="data/train_labels.csv", test_list="data/test_labels.csv",
              image_size=[96, 128], max_boxes=most - 1, data_dir=str(data_dir))


def test_voc_folder_seeded_split_and_class_list(tmp_path, data_dir):
    root = tmp_path / "voc"
    _voc_folder(root)
    source = build("voc_folder", path=str(root), classes=["dog", "cat", "bird"], max_boxes=3, test_fraction=0.4,
                   data_dir=str(data_dir))
    assert source.info.splits == {"train": 3, "test": 2} and source.info.image_shape == (40, 60, 3)
    assert source.info.class_names == ("dog", "cat", "bird")
    for split in ("train", "test"):
        raw = raw_split(source, split)
        for i, ex in enumerate(examples(source.split(split))):
            stem = Path(raw[i]["filename"].decode()).stem
            _, boxes, names = _xml_boxes(root / "annotations" / f"{stem}.xml")
            np.testing.assert_allclose(ex["boxes"][: len(boxes)], boxes, atol=1e-6)
            assert ex["labels"][: len(names)].tolist() == [("dog", "cat", "bird").index(n) for n in names]
            assert ex["box_valid"].sum() == len(names)


@pytest.mark.parametrize("problem, match", [
    ("outside", r"im1.xml: object 1 box .*xmax=61.* lies outside the 60x40 image"),
    ("empty_box", r"im0.xml: object 0 box .* has non-positive size"),
    ("unknown_class", r"im0.xml: object 0 has class 'cat', not in dataset.classes \(dog\): label out of range"),
    ("missing_image", r"im3.xml: annotation references a missing image .*images/im3.jpg"),
    ("size_mismatch", r"im2.xml: states size 50x40 but .*im2.jpg is 60x40"),
    ("bad_list", r"train.txt: 1 image\(s\) without an annotation .*: im9"),
])
def test_voc_folder_bad_annotations_are_clear_errors(tmp_path, problem, match):
    root = tmp_path / "voc"
    _voc_folder(root)
    fields = {}
    if problem == "outside":
        _voc_xml(root / "annotations" / "im1.xml", "im1.jpg", (40, 60),
                 [("cat", (1, 2, 30, 20)), ("dog", (10, 5, 61, 40))])
    elif problem == "empty_box":
        _voc_xml(root / "annotations" / "im0.xml", "im0.jpg", (40, 60), [("cat", (10, 2, 10, 20))])
    elif problem == "unknown_class":
        fields["classes"] = ["dog"]
    elif problem == "missing_image":
        (root / "images" / "im3.jpg").unlink()
    elif problem == "size_mismatch":
        _voc_xml(root / "annotations" / "im2.xml", "im2.jpg", (40, 50), [("cat", (1, 2, 30, 20))])
    elif problem == "bad_list":
        (root / "train.txt").write_text("im0\nim1.jpg\nim9\n")
        (root / "test.txt").write_text("im2\n")
        fields.update(train_list="train.txt", test_list="test.txt")
    with pytest.raises(DataError, match=match):
        build("voc_folder", path=str(root), data_dir=str(tmp_path / "data"), **fields)
    assert not variants(tmp_path / "data", "voc_folder")  # nothing half-written


def test_voc_folder_skips_bad_annotations_when_asked(tmp_path, caplog):
    """on_bad_annotation=skip: a missing image drops its annotation (and its split-list entry), a box outside
    the image or without area drops that object; each is logged with its XML file."""
    root = tmp_path / "voc"
    _voc_folder(root, n=6)
    _voc_xml(root / "annotations" / "im1.xml", "im1.jpg", (40, 60), [("cat", (1, 2, 30, 20)), ("dog", (10, 5, 61, 40))])
    _voc_xml(root / "annotations" / "im0.xml", "im0.jpg", (40, 60), [("cat", (10, 2, 10, 20))])
    (root / "images" / "im3.jpg").unlink()
    (root / "train.txt").write_text("im0\nim1\nim2\nim3\nim4\n")
    (root / "test.txt").write_text("im5\n")
    with caplog.at_level(logging.WARNING, logger="prism"):
        source = build("voc_folder", path=str(root), train_list="train.txt", test_list="test.txt", max_boxes=2,
                       on_bad_annotation="skip", data_dir=str(tmp_path / "data"))
    assert source.info.splits == {"train": 4, "test": 1}
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 bad annotation(s)" in message
    for part in ("im0.xml: object 0 box", "non-positive size", "im1.xml: object 1 box", "lies outside the 60x40",
                 "im3.xml: annotation references a missing image"):
        assert part in message
    raw = raw_split(source, "train")
    by_name = {raw[i]["filename"].decode(): ex for i, ex in enumerate(examples(source.split("train")))}
    assert sorted(by_name) == ["im0.jpg", "im1.jpg", "im2.jpg", "im4.jpg"]
    assert by_name["im0.jpg"]["box_valid"].tolist() == [False, False]  # its only box was skipped
    assert by_name["im1.jpg"]["box_valid"].tolist() == [True, False]
    np.testing.assert_allclose(by_name["im1.jpg"]["boxes"][0], [2 / 40, 1 / 60, 20 / 40, 30 / 60], atol=1e-6)
    with pytest.raises(ConfigError, match="on_bad_annotation must be 'fail' or 'skip', got 'ignore'"):
        build("voc_folder", path=str(root), on_bad_annotation="ignore", data_dir=str(tmp_path / "data"))


def test_voc_folder_skips_a_corrupt_image(tmp_path, caplog):
    root = tmp_path / "voc"
    _voc_folder(root)
    bad = root / "images" / "im4.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="prism"):
        source = build("voc_folder", path=str(root), test_fraction=0.0, eval_split="train",
                       data_dir=str(tmp_path / "data"))
    assert source.info.splits["train"] == 4
    assert any(f"skipped 1 corrupt images: {bad}" in r.getMessage() for r in caplog.records)


# -- mask_folder ------------------------------------------------------------------------------------
@pytest.mark.skipif(not ISBI.is_dir(), reason=f"shared data {ISBI} absent (a fresh clone has no ../shared)")
def test_mask_folder_isbi_membranes(data_dir):
    source = build("mask_folder", path=str(ISBI), channels=1, test_count=5, data_dir=str(data_dir))
    info = source.info
    assert info.splits == {"train": 25, "test": 5} and info.num_classes == 2
    assert info.image_shape == (512, 512, 1) and info.class_names == ("0", "1")
    names = []
    for split in ("train", "test"):
        raw = raw_split(source, split)
        for i, ex in enumerate(examples(source.split(split))):
            name = raw[i]["filename"].decode()
            names.append(name)
            assert ex["mask"].shape == (512, 512) and ex["mask"].dtype == np.int32
            assert set(np.unique(ex["mask"]).tolist()) == {0, 1}
            np.testing.assert_array_equal(ex["mask"], np.asarray(Image.open(ISBI / "label" / name)) >= 128)
            np.testing.assert_array_equal(ex["image"][..., 0], np.asarray(Image.open(ISBI / "image" / name)))
    assert sorted(names) == sorted(p.name for p in (ISBI / "image").glob("*.png")) and len(names) == 30

    small = build("mask_folder", path=str(ISBI), channels=1, test_count=5, image_size=[128, 128],
                  data_dir=str(data_dir))
    ex = small.split("test")[0]
    assert ex["image"].shape == (128, 128, 1) and ex["mask"].shape == (128, 128)
    full = source.split("test")[0]
    np.testing.assert_array_equal(ex["mask"], resized(full["mask"].astype(np.uint8)[..., None], (128, 128),
                                                      Image.Resampling.NEAREST)[..., 0])
    assert len(variants(data_dir, "mask_folder")) == 1  # resizing reuses the prepared data


def _mask_pairs(root: Path, n: int = 4, size=(16, 12)) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        _image(root / "image" / f"{i}.png", size, seed=i)
        mask = rng.choice(np.array([0, 128, 255], np.uint8), size=size)
        (root / "label").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "label" / f"{i}.png")


def test_mask_folder_value_mapping(tmp_path):
    root = tmp_path / "seg"
    _mask_pairs(root)
    source = build("mask_folder", path=str(root), num_classes=3, mask_values=[0, 128, 255],
                   class_names=["bg", "edge", "cell"], test_fraction=0.25, data_dir=str(tmp_path / "data"))
    assert source.info.splits == {"train": 3, "test": 1} and source.info.class_names == ("bg", "edge", "cell")
    raw = raw_split(source, "test")
    mask = np.asarray(Image.open(root / "label" / raw[0]["filename"].decode()))
    np.testing.assert_array_equal(source.split("test")[0]["mask"], np.searchsorted([0, 128, 255], mask))


@pytest.mark.parametrize("problem, match", [
    ("size", r"mask .*label/2.png is 10x10 but its image .*image/2.png is 12x16"),
    ("values", r"mask .*label/\d.png has pixel values \[128\] outside dataset.mask_values \[0, 255\]"),
    ("no_mask", r"image .*image/3.png has no mask in .*label"),
    ("no_image", r"mask .*label/7.png has no image in .*image"),
    ("no_dir", r"dataset.masks='.*seg/masks': no such directory"),
])
def test_mask_folder_bad_pairs_are_clear_errors(tmp_path, problem, match):
    root = tmp_path / "seg"
    _mask_pairs(root)
    fields: dict = {"num_classes": 2, "mask_values": [0, 255]} if problem == "values" else {}
    if problem == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "label" / "2.png")
    elif problem == "no_mask":
        (root / "label" / "3.png").unlink()
    elif problem == "no_image":
        Image.fromarray(np.zeros((16, 12), np.uint8)).save(root / "label" / "7.png")
    elif problem == "no_dir":
        fields["masks"] = "masks"
    with pytest.raises(DataError, match=match):
        build("mask_folder", path=str(root), data_dir=str(tmp_path / "data"), **fields)
    with pytest.raises(ConfigError, match="num_classes=3 needs dataset.mask_values"):
        build("mask_folder", path=str(root), num_classes=3)


def test_no_tensorflow_was_imported():
    assert "tensorflow" not in sys.modules


def test_folder_files_read_on_worker_processes_in_order_with_bad_files_reported(tmp_path):
    """Preparation reads headers and images on every core (spawned processes); order and errors must hold."""
    from functools import partial

    from PIL import Image

    from prism.plugins.datasets import _parallel_read as pr

    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4 + i, 9 - i, 3), 20 * i, np.uint8)).save(path)
        paths.append(path)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(3, tmp_path / "bad.png")
    serial = list(pr.map_ordered(pr.read_header, paths, workers=1))
    spread = list(pr.map_ordered(pr.read_header, paths, workers=2, chunk=2))
    assert [ok for ok, _ in spread] == [ok for ok, _ in serial] == [True] * 3 + [False] + [True] * 4
    assert isinstance(spread[3][1], pr.DECODE_ERRORS)
    assert [v for ok, v in spread if ok] == [v for ok, v in serial if ok] == [((4 + i, 9 - i), "RGB") for i in range(7)]
    encoded = list(pr.map_ordered(partial(pr.encoded_image, channels=3), paths, workers=2, chunk=3))
    assert [v for ok, v in encoded if ok] == [(p.read_bytes(), ((4 + i, 9 - i))) for i, p in enumerate(
        p for p in paths if p.name != "bad.png")]


def test_loader_threads_default_to_the_machines_cores(monkeypatch):
    import os

    from prism.framework.config import compose
    from prism.framework.data import MAX_AUTO_THREADS, read_threads

    assert compose([]).loader.threads == -1  # the default: sized to the machine
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert read_threads(-1) == MAX_AUTO_THREADS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert read_threads(-1) == 2 and read_threads(0) == 0 and read_threads(5) == 5
