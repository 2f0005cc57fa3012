"""Segmentation: metrics and losses against plain NumPy, the elastic transform, PNG renders, bad mask
folders, and the ISBI 2012 preset trained for a few steps on the real images (exact split metrics)."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from prism.framework.augment import Pipeline, build_transform
from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import DATASETS, METRICS, OBJECTIVES, TASKS
from prism.plugins.metrics.segmentation import summarize_confusion
from prism.plugins.objectives.segmentation import SegmentationLossConfig
from prism.plugins.tasks.segmentation import SegmentationConfig, palette
from prism.plugins.transforms.elastic import deform, displacement_field

ISBI = Path(__file__).resolve().parents[1].parent / "shared/data/isbi2012_membrane/data/membrane/train"


# -- NumPy references ---------------------------------------------------------------------------------------
def numpy_metrics(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Pixel accuracy, per-class IoU/Dice and their means, straight from the definitions over all pixels."""
    pred, labels = pred.ravel(), labels.ravel()
    valid = (labels >= 0) & (labels < num_classes)
    pred, labels = pred[valid], labels[valid]
    out = {"pixel_accuracy": np.mean(pred == labels)}
    ious, dices = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
            dices.append(2 * tp / (2 * tp + fp + fn))
        out[f"iou/{c}"] = tp / (tp + fp + fn) if tp + fp + fn else np.nan
        out[f"dice/{c}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else np.nan
    out["miou"], out["mdice"] = np.mean(ious), np.mean(dices)
    return out


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logits_and_labels(seed=0, n=7, h=9, w=11, c=3):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, h, w, c)).astype(np.float32)
    labels = rng.integers(0, c, size=(n, h, w)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.1] = 255  # "ignore" labels
    labels[0, 0, :3] = -1
    return logits, labels


# -- metrics ------------------------------------------------------------------------------------------------
def test_confusion_metrics_match_numpy_exactly_over_batches():
    logits, labels = _logits_and_labels()
    confusion = METRICS.build("confusion_matrix", METRICS.get("confusion_matrix").config(num_classes=3))
    # Batches of 3, 3, 1 as evaluation would see them; the summary is over the concatenated per-example counts.
    parts = [np.asarray(jax.jit(confusion)(logits[i:i + 3], labels[i:i + 3])) for i in range(0, 7, 3)]
    counts = np.concatenate(parts)
    assert counts.shape == (7, 3, 3) and counts.dtype == np.int32
    for i in range(7):  # each per-example matrix is the plain 2-D histogram of (label, prediction)
        valid = labels[i] < 3
        valid &= labels[i] >= 0
        expected = np.histogram2d(labels[i][valid], logits[i].argmax(-1)[valid], bins=3, range=[[0, 3], [0, 3]])[0]
        np.testing.assert_array_equal(counts[i], expected)
    got = summarize_confusion(counts)
    want = numpy_metrics(logits.argmax(-1), labels, 3)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
    assert got["pixel_error"] == pytest.approx(1 - want["pixel_accuracy"])
    # The mean of per-batch IoUs is a different (wrong) number: the summary must not be that.
    per_batch = np.mean([summarize_confusion(p)["miou"] for p in parts])
    assert abs(per_batch - got["miou"]) > 1e-4


def test_absent_class_is_left_out_of_the_mean_and_valid_crop():
    logits = np.zeros((1, 2, 2, 3), np.float32)
    logits[..., 0] = 1.0  # predicts class 0 everywhere
    labels = np.array([[[0, 1], [0, 0]]], np.int32)  # class 2 never occurs
    counts = np.asarray(METRICS.build("confusion_matrix", METRICS.get("confusion_matrix").config(num_classes=3))(
        logits, labels))
    got = summarize_confusion(counts, ("a", "b", "c"))
    assert got["iou/a"] == pytest.approx(3 / 4) and got["iou/b"] == 0.0 and np.isnan(got["iou/c"])
    assert got["miou"] == pytest.approx((3 / 4 + 0) / 2) and got["dice/a"] == pytest.approx(6 / 7)
    # Logits smaller than the mask (valid-padding U-Net) are compared with the mask's centre.
    big = np.full((1, 6, 6), 1, np.int32)
    big[0, 2:4, 2:4] = labels[0]
    np.testing.assert_array_equal(np.asarray(METRICS.build(
        "confusion_matrix", METRICS.get("confusion_matrix").config(num_classes=3))(logits, big)), counts)


# -- objective ----------------------------------------------------------------------------------------------
def _objective(data_classes=3, **fields):
    from prism.framework.api import DataInfo

    info = DataInfo(num_classes=data_classes, image_shape=(9, 11, 1))
    return OBJECTIVES.build("segmentation", SegmentationLossConfig(**fields), model=None, data=info, rngs=None)


def test_losses_match_numpy():
    logits, labels = _logits_and_labels(seed=1)
    model = lambda images: jnp.asarray(logits)  # noqa: E731  (a model whose output is given)
    batch = {"image": jnp.zeros((7, 9, 11, 1)), "mask": jnp.asarray(labels)}
    valid = (labels >= 0) & (labels < 3)
    logp = numpy_log_softmax(logits.astype(np.float64))
    nll = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    ce = nll[valid].mean()
    weights = np.array([0.5, 2.0, 1.0])
    w = weights[np.where(valid, labels, 0)] * valid
    weighted_ce = (nll * w).sum() / w.sum()
    probs = np.exp(logp) * valid[..., None]
    onehot = np.stack([(labels == c) & valid for c in range(3)], -1)
    dice = 1 - np.mean([(2 * (probs[..., c] * onehot[..., c]).sum() + 1) / (probs[..., c].sum() + onehot[..., c].sum()
                                                                          + 1) for c in range(3)])
    key = jax.random.key(0)
    loss, metrics = _objective(loss="ce")(model, batch, key)
    np.testing.assert_allclose(loss, ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["pixel_accuracy"], np.mean(logits.argmax(-1)[valid] == labels[valid]), rtol=1e-6)
    # A mask larger than the logits (valid-padding U-Net): its centre is the target.
    framed = np.pad(labels, ((0, 0), (2, 2), (3, 3)), constant_values=1)
    framed_batch = {"image": jnp.zeros((7, 13, 17, 1)), "mask": jnp.asarray(framed)}
    np.testing.assert_allclose(_objective(loss="ce")(model, framed_batch, key)[0], ce, rtol=1e-5)
    np.testing.assert_allclose(_objective(loss="ce", class_weights=list(weights))(model, batch, key)[0], weighted_ce,
                               rtol=1e-5)
    np.testing.assert_allclose(_objective(loss="dice")(model, batch, key)[0], dice, rtol=1e-5)
    np.testing.assert_allclose(_objective(loss="ce_dice", dice_weight=0.5)(model, batch, key)[0], ce + 0.5 * dice,
                               rtol=1e-5)
    with pytest.raises(ConfigError, match="objective.loss must be one of ce, dice, ce_dice, got 'focal'"):
        _objective(loss="focal")
    with pytest.raises(ConfigError, match="class_weights has 2 values for 3 classes"):
        _objective(class_weights=[1.0, 2.0])


# -- elastic deformation ------------------------------------------------------------------------------------
def _coordinate_example(h=24, w=20):
    """An image whose channels are the pixel's own (y, x) and a mask holding each pixel's index."""
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return {"image": jnp.asarray(np.stack([ys, xs, np.ones_like(ys)], -1)),
            "mask": jnp.asarray((ys * w + xs).astype(np.int32))}


def test_elastic_is_identity_at_sigma_zero():
    ex = _coordinate_example()
    out = jax.jit(build_transform({"name": "elastic", "sigma": 0.0}))(ex, jax.random.key(3))
    np.testing.assert_array_equal(out["image"], ex["image"])
    np.testing.assert_array_equal(out["mask"], ex["mask"])


def test_elastic_field_follows_the_paper_and_mask_moves_with_image():
    # 9x9 image, 3x3 grid: the nodes fall on pixels 1, 4, 7, where the bicubic field equals the Gaussian draws.
    key = jax.random.key(7)
    field = np.asarray(displacement_field(key, 9, 9, grid=3, sigma=10.0))
    np.testing.assert_allclose(field[:, 1::3, 1::3], 10.0 * np.asarray(jax.random.normal(key, (2, 3, 3))), atol=1e-4)
    draws = np.stack([np.asarray(displacement_field(jax.random.key(s), 9, 9, 3, 10.0))[:, 1::3, 1::3]
                      for s in range(200)])
    assert 9.0 < draws.std() < 11.0  # sigma is the standard deviation of the grid displacements, in pixels

    h, w = 24, 20
    ex = _coordinate_example(h, w)
    field = displacement_field(jax.random.key(1), h, w, 3, 3.0)
    out = jax.jit(deform, static_argnums=2)(ex, field, "nearest")
    field = np.asarray(field)
    # Independent reference: SciPy's map_coordinates with the same field (bilinear image, nearest mask).
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [ys + field[0], xs + field[1]]
    for c in range(3):
        np.testing.assert_allclose(out["image"][..., c], scipy.ndimage.map_coordinates(
            np.asarray(ex["image"][..., c]), coords, order=1, mode="nearest"), atol=1e-4)
    # Image and mask moved together: the mask's source pixel is the image's source point, rounded.
    sy, sx = np.divmod(np.asarray(out["mask"]), w)
    np.testing.assert_array_equal(sy, np.clip(np.round(np.asarray(out["image"][..., 0])), 0, h - 1))
    np.testing.assert_array_equal(sx, np.clip(np.round(np.asarray(out["image"][..., 1])), 0, w - 1))
    assert np.abs(field).max() > 1.0  # it did move


def test_elastic_in_a_pipeline_and_its_errors():
    base = _coordinate_example(16, 16)
    batch = {k: jnp.stack([v, v]) for k, v in base.items()}
    out = jax.jit(Pipeline.from_config([{"name": "elastic", "sigma": 4.0}]))(batch, jax.random.key(0))
    assert out["mask"].dtype == jnp.int32 and out["image"].shape == (2, 16, 16, 3)
    assert not np.array_equal(out["mask"][0], out["mask"][1])  # one field per example
    with pytest.raises(ConfigError, match="mode must be one of"):
        build_transform({"name": "elastic", "mode": "zeros"})
    with pytest.raises(ConfigError, match="sigma must be >= 0"):
        build_transform({"name": "elastic", "sigma": -1.0})
    boxed = {**base, "boxes": jnp.zeros((1, 4)), "box_valid": jnp.ones((1,), bool)}
    with pytest.raises(ConfigError, match="cannot move boxes"):
        build_transform({"name": "elastic"})(boxed, jax.random.key(0))


# -- render -------------------------------------------------------------------------------------------------
def test_render_draws_prediction_beside_ground_truth(tmp_path):
    from prism.framework.api import DataInfo

    task = TASKS.build("segmentation", SegmentationConfig(overlay_alpha=0.5),
                       data=DataInfo(num_classes=2, image_shape=(8, 8, 1)))
    image = np.arange(2 * 12 * 12, dtype=np.uint8).reshape(2, 12, 12, 1)
    truth = np.zeros((2, 12, 12), np.int32)
    truth[:, 2:6, 2:6] = 1
    prediction = np.zeros((2, 8, 8), np.uint8)  # a valid-padding model: the centre 8x8 of each image
    prediction[:, 4:, 4:] = 1
    paths = task.render({"image": image, "mask": truth}, {"prediction": prediction}, tmp_path / "predictions")
    assert [p.name for p in paths] == ["000.png", "001.png"]
    png = np.asarray(Image.open(paths[1]).convert("RGB"))
    scale, gap = 128 // 8, 2
    assert png.shape == (14 + 8 * scale, (8 + gap + 8) * scale, 3)
    left = png[14::scale, 0:8 * scale:scale]  # one pixel per source pixel
    right = png[14::scale, (8 + gap) * scale::scale]
    centre = np.repeat(image[1, 2:10, 2:10], 3, -1).astype(np.float64)
    red = palette(2)[1].astype(np.float64)
    want_left = np.where(prediction[1][..., None] == 1, np.round(0.5 * centre + 0.5 * red), centre)
    want_right = np.where(truth[1, 2:10, 2:10][..., None] == 1, np.round(0.5 * centre + 0.5 * red), centre)
    np.testing.assert_array_equal(left, want_left)
    np.testing.assert_array_equal(right, want_right)


def test_predict_outputs_and_render_without_ground_truth(tmp_path):
    """``prism predict`` path: class maps of unlabelled images, drawn without a ground-truth panel."""
    from flax import nnx

    from prism.framework.api import DataInfo

    task = TASKS.build("segmentation", SegmentationConfig(overlay_alpha=0.5),
                       data=DataInfo(num_classes=3, image_shape=(6, 6, 1)))
    model = nnx.Conv(1, 3, kernel_size=(1, 1), rngs=nnx.Rngs(0))
    images = jax.random.uniform(jax.random.key(1), (2, 6, 6, 1))
    prediction = np.asarray(task.predict_outputs(model, {"image": images})["prediction"])
    np.testing.assert_array_equal(prediction, np.asarray(model(images)).argmax(-1))
    paths = task.render({"image": (np.asarray(images) * 255).astype(np.uint8)}, {"prediction": prediction},
                        tmp_path / "predict")
    png = np.asarray(Image.open(paths[0]).convert("RGB"))
    assert png.shape == (14 + 6 * (128 // 6), 6 * (128 // 6), 3)  # one panel: no ground truth to show


# -- bad mask folders ---------------------------------------------------------------------------------------
def test_mask_of_other_size_fails_or_is_skipped_by_config(tmp_path, caplog):
    root = tmp_path / "seg"
    rng = np.random.default_rng(0)
    for sub in ("image", "label"):
        (root / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 12), np.uint8)).save(root / "image" / f"{i}.png")
        size = (10, 10) if i == 2 else (16, 12)
        Image.fromarray(rng.choice(np.array([0, 255], np.uint8), size=size)).save(root / "label" / f"{i}.png")
    cfg = DATASETS.get("mask_folder").config
    with pytest.raises(DataError, match=r"mask .*label/2.png is 10x10 but its image .*image/2.png is 12x16; .*"
                                        r"dataset.on_size_mismatch=skip"):
        DATASETS.build("mask_folder", cfg(path=str(root), data_dir=str(tmp_path / "d"), test_count=1))
    with caplog.at_level(logging.WARNING, logger="prism"):
        source = DATASETS.build("mask_folder", cfg(path=str(root), data_dir=str(tmp_path / "d"), test_count=1,
                                                   on_size_mismatch="skip"))
    assert source.info.splits == {"train": 2, "test": 1}
    assert "label/2.png is 10x10" in caplog.text
    with pytest.raises(ConfigError, match="on_size_mismatch must be 'fail' or 'skip'"):
        DATASETS.build("mask_folder", cfg(path=str(root), on_size_mismatch="warn"))


# -- the ISBI 2012 preset, a few steps on the real images ----------------------------------------------------
@pytest.mark.skipif(not ISBI.is_dir(), reason=f"ISBI 2012 membranes not found at {ISBI} (../shared/data)")
def test_unet_isbi2012_preset_trains_and_reports_exact_metrics(tmp_path):
    from prism.framework import parallel
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    cfg = compose(["+experiment=unet_isbi2012", f"dataset.path={ISBI}",
                   "dataset.image_size=[32,32]", "model.width=4", "model.levels=1", "train.steps=3",
                   "train.batch_size=4", "train.eval_batch_size=4", "train.eval_every=3", "augment.ops.2.sigma=1.0",
                   "logging.progress=false", "logging.tensorboard=false", "logging.plots=false",
                   "logging.render=3", "checkpoint.enabled=false", "precision=fp32"])
    trainer = Trainer(cfg, tmp_path / "run")
    result = trainer.fit()
    assert result["status"] == "completed" and trainer.info.class_names == ("cell", "membrane")
    metrics = result["metrics"]
    assert {"eval/iou/membrane", "eval/dice/membrane", "eval/pixel_error", "eval/miou"} <= set(metrics)
    renders = sorted((tmp_path / "run" / "predictions").glob("*.png"))
    assert [p.name for p in renders] == ["000.png", "001.png", "002.png"]
    assert Image.open(renders[0]).size == ((32 + 2 + 32) * 4, 32 * 4 + 14)  # two 32x32 panels, scaled 4x, captions
    # Recompute from the trained model one test image at a time (a global batch of 4 copies; the run used
    # padded batches of 4 over 4 devices for the 5 images, i.e. one image per device either way).
    test = [trainer.eval_split[i] for i in range(len(trainer.eval_split))]
    assert len(test) == 5
    predictions = []
    eval_step = trainer.evaluation.programs(trainer.task)[0]
    for ex in test:
        batch = parallel.global_batch(trainer.mesh, {k: np.stack([v] * 4) for k, v in ex.items()})
        predictions.append(np.asarray(eval_step(trainer.state, batch)[0]["prediction"])[0])
    raw = np.stack([ex["mask"] for ex in test])
    want = numpy_metrics(np.stack(predictions), raw, 2)
    for key, name in (("pixel_accuracy", "pixel_accuracy"), ("iou/1", "iou/membrane"), ("dice/1", "dice/membrane"),
                      ("iou/0", "iou/cell"), ("miou", "miou")):
        np.testing.assert_allclose(metrics[f"eval/{name}"], want[key], rtol=1e-12, err_msg=name)
    assert metrics["eval/pixel_error"] == pytest.approx(1 - want["pixel_accuracy"])
    # The membranes (black in the label PNGs) are class 1, the minority class.
    assert 0.1 < raw.mean() < 0.4


def test_masks_named_by_a_pattern_pair_with_their_images_even_in_one_folder(tmp_path):
    """``x_mask.png`` beside ``x.jpg`` (how many public sets ship): before, 'mask ... has no image'."""
    from prism.plugins.datasets.mask_folder import mask_stem_matcher

    assert mask_stem_matcher("{stem}_mask")("a_b_mask.png") == "a_b"
    assert mask_stem_matcher("{stem}_mask")("a_b.png") is None
    assert mask_stem_matcher("{stem}_mask.png")("a_mask.jpg") is None  # that extension only
    assert mask_stem_matcher("{stem}")("a.png") == "a"
    root = tmp_path / "seg"
    (root / "all").mkdir(parents=True)
    rng = np.random.default_rng(0)
    masks = {}
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 12, 3), np.uint8)).save(root / "all" / f"cell_{i}.jpg")
        masks[i] = rng.choice(np.array([0, 255], np.uint8), size=(16, 12))
        Image.fromarray(masks[i]).save(root / "all" / f"cell_{i}_mask.png")
    cfg = DATASETS.get("mask_folder").config
    source = DATASETS.build("mask_folder", cfg(path=str(root), images="all", masks="all", mask_pattern="{stem}_mask",
                                               data_dir=str(tmp_path / "d"), test_count=1, channels=3))
    assert source.info.splits == {"train": 3, "test": 1}
    examples = [*source.split("train"), *source.split("test")]
    got = sorted(tuple(np.asarray(e["mask"]).ravel()) for e in examples)
    assert got == sorted(tuple((m >= 128).astype(np.int32).ravel()) for m in masks.values())  # each its own mask
    with pytest.raises(ConfigError, match="set dataset.mask_pattern"):
        DATASETS.build("mask_folder", cfg(path=str(root), images="all", masks="all"))
    with pytest.raises(ConfigError, match="must hold {stem} once"):
        DATASETS.build("mask_folder", cfg(path=str(root), mask_pattern="mask_{stem}_{stem}"))
