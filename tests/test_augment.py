"""On-device augmentations: geometric transforms move boxes and masks with the image; photometric
ones match NumPy/colorsys definitions; pipelines are per-example, deterministic and validated."""

from __future__ import annotations

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism.framework.augment import Pipeline, build_transform
from prism.framework.errors import ConfigError, UnknownNameError


def _example_with_box(h=24, w=32, box=(6, 8, 14, 20)):
    """An image and mask holding one filled rectangle, and its box (normalized yx-yx)."""
    y0, x0, y1, x1 = box
    mask = np.zeros((h, w), np.int32)
    mask[y0:y1, x0:x1] = 1
    image = np.stack([mask * 0.9, np.linspace(0, 1, h * w).reshape(h, w), mask * 0.3], -1).astype(np.float32)
    boxes = np.array([[y0 / h, x0 / w, y1 / h, x1 / w], [0, 0, 0, 0]], np.float32)
    return {"image": jnp.asarray(image), "mask": jnp.asarray(mask), "boxes": jnp.asarray(boxes),
            "box_valid": jnp.array([True, False])}


def _mask_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w])


def test_hflip_vflip_move_image_mask_and_boxes():
    ex = _example_with_box()
    for name, axis in (("hflip", 1), ("vflip", 0)):
        out = build_transform({"name": name, "p": 1.0})(ex, jax.random.key(0))
        np.testing.assert_array_equal(out["image"], np.flip(ex["image"], axis))
        np.testing.assert_array_equal(out["mask"], np.flip(ex["mask"], axis))
        np.testing.assert_allclose(out["boxes"][0], _mask_box(np.asarray(out["mask"])), atol=1e-6)
    unchanged = build_transform({"name": "hflip", "p": 0.0})(ex, jax.random.key(0))
    np.testing.assert_array_equal(unchanged["image"], ex["image"])


@pytest.mark.parametrize("seed", range(6))
def test_random_resized_crop_keeps_box_on_mask(seed):
    ex = _example_with_box()
    crop = build_transform({"name": "random_resized_crop", "size": [20, 20], "scale": [0.3, 1.0]})
    out = jax.jit(crop)(ex, jax.random.key(seed))
    assert out["image"].shape == (20, 20, 3) and out["mask"].shape == (20, 20)
    mask = np.asarray(out["mask"])
    if mask.any():
        # The box transformed analytically and the mask resampled by nearest neighbour agree to a pixel.
        np.testing.assert_allclose(out["boxes"][0], _mask_box(mask), atol=1.01 / 20)
        assert bool(out["box_valid"][0])
    assert not bool(out["box_valid"][1])  # padding boxes stay invalid


def test_full_crop_at_same_size_is_identity():
    ex = _example_with_box(h=16, w=16, box=(4, 4, 10, 12))
    crop = build_transform({"name": "random_resized_crop", "size": [16, 16], "scale": [1.0, 1.0],
                            "ratio": [1.0, 1.0]})
    out = crop(ex, jax.random.key(3))
    np.testing.assert_allclose(out["image"], ex["image"], atol=1e-6)
    np.testing.assert_array_equal(out["mask"], ex["mask"])
    np.testing.assert_allclose(out["boxes"], ex["boxes"], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_rotation_box_encloses_rotated_mask(seed):
    ex = _example_with_box(h=32, w=32, box=(10, 10, 20, 22))
    out = build_transform({"name": "rotate", "degrees": 40.0})(ex, jax.random.key(seed))
    box, mask_box = np.asarray(out["boxes"][0]), _mask_box(np.asarray(out["mask"]))
    tol = 1.01 / 32
    assert box[0] <= mask_box[0] + tol and box[1] <= mask_box[1] + tol
    assert box[2] >= mask_box[2] - tol and box[3] >= mask_box[3] - tol
    # The mask keeps (about) its area under rotation; the envelope box grows, never shrinks.
    assert abs(int(np.asarray(out["mask"]).sum()) - 120) <= 12


def test_photometric_ops_match_numpy():
    rng = np.random.default_rng(0)
    img = rng.uniform(size=(5, 6, 3)).astype(np.float32)
    ex = {"image": jnp.asarray(img)}
    solar = build_transform({"name": "solarize", "threshold": 0.5, "p": 1.0})(ex, jax.random.key(0))
    np.testing.assert_allclose(solar["image"], np.where(img >= 0.5, 1 - img, img), atol=1e-6)
    gray = build_transform({"name": "grayscale", "p": 1.0})(ex, jax.random.key(0))
    luma = img @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(gray["image"], np.repeat(luma[..., None], 3, -1), atol=1e-6)
    norm = build_transform({"name": "normalize", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.1]})(ex, None)
    np.testing.assert_allclose(norm["image"], (img - [0.5, 0.4, 0.3]) / [0.2, 0.2, 0.1], rtol=1e-5)


def test_hsv_round_trip_matches_colorsys():
    from prism.plugins.transforms.photometric import adjust_hue, hsv_to_rgb, rgb_to_hsv

    rng = np.random.default_rng(1)
    rgb = rng.uniform(size=(50, 3)).astype(np.float32)
    hsv = np.asarray(rgb_to_hsv(jnp.asarray(rgb)))
    np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-5)
    np.testing.assert_allclose(hsv_to_rgb(jnp.asarray(hsv)), rgb, atol=1e-5)
    shifted = np.asarray(adjust_hue(jnp.asarray(rgb)[None], 0.25))[0]
    expected = [colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v) for h, s, v in hsv]
    np.testing.assert_allclose(shifted, expected, atol=1e-5)


def test_gaussian_blur_preserves_constant_image_and_smooths():
    blur = build_transform({"name": "gaussian_blur", "kernel_size": 5, "sigma": [1.0, 1.0], "p": 1.0})
    flat = {"image": jnp.full((9, 9, 1), 0.7)}
    np.testing.assert_allclose(blur(flat, jax.random.key(0))["image"], 0.7, atol=1e-6)
    spike = np.zeros((9, 9, 1), np.float32)
    spike[4, 4] = 1.0
    out = np.asarray(blur({"image": jnp.asarray(spike)}, jax.random.key(0))["image"])[..., 0]
    k = np.exp(-0.5 * np.arange(-2, 3) ** 2)
    k /= k.sum()
    np.testing.assert_allclose(out[2:7, 2:7], np.outer(k, k), atol=1e-6)


def test_pipeline_is_per_example_deterministic_and_normalizes():
    pipe = Pipeline.from_config([{"name": "random_resized_crop", "size": [8, 8]}, "hflip"], mean=[0.5], std=[0.25])
    images = jnp.tile(jnp.linspace(0, 1, 64).reshape(1, 8, 8, 1), (4, 1, 1, 1))
    batch = {"image": images, "label": jnp.arange(4)}
    a, b = jax.jit(pipe)(batch, jax.random.key(0)), jax.jit(pipe)(batch, jax.random.key(0))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], batch["label"])
    assert len({np.asarray(a["image"][i]).tobytes() for i in range(4)}) == 4  # independent per example
    plain = Pipeline([], mean=[0.5], std=[0.25])(batch, jax.random.key(0))
    np.testing.assert_allclose(plain["image"], (images - 0.5) / 0.25)


def test_bad_transform_config_names_the_culprit():
    with pytest.raises(UnknownNameError, match="Did you mean: hflip"):
        build_transform({"name": "hflp"})
    with pytest.raises(ConfigError, match=r"augment.ops\[1\]: transform 'solarize'.*treshold"):
        Pipeline.from_config(["hflip", {"name": "solarize", "treshold": 0.3}])
    with pytest.raises(ConfigError, match="random_resized_crop: scale"):
        build_transform({"name": "random_resized_crop", "scale": [0.9, 0.1]})
    with pytest.raises(ConfigError, match=r"augment.ops: transform 'resize': size must be an int or \[height, width\]"):
        build_transform({"name": "resize", "size": [8, 8, 8]})


def test_presets_compose_for_training():
    from prism.framework.config import compose

    cfg = compose(["augment=simclr"])
    assert len(cfg.augment.views) == 2 and cfg.augment.views[0][0]["name"] == "random_resized_crop"
    byol = compose(["augment=byol"])
    blur_p = [next(op["p"] for op in view if op["name"] == "gaussian_blur") for view in byol.augment.views]
    assert blur_p == [1.0, 0.1]
    for view in byol.augment.views:
        Pipeline.from_config(view)  # every op and field is valid


def test_alternating_flip_flips_each_example_in_every_other_epoch():
    from prism.framework.augment import EPOCH_KEY, EXAMPLE_INDEX_KEY, Pipeline
    from prism.framework.errors import ConfigError
    from prism.framework.steps import batch_epochs

    pipeline = Pipeline.from_config([{"name": "hflip", "alternate": True}])
    n = 1000
    image = jnp.broadcast_to(jnp.arange(4, dtype=jnp.float32)[None, None, :, None], (n, 2, 4, 1))

    def flipped(epoch: int, key: int) -> np.ndarray:
        batch = {"image": image, EXAMPLE_INDEX_KEY: jnp.arange(n, dtype=jnp.int32),
                 EPOCH_KEY: jnp.full((n,), epoch, jnp.int32)}
        out = np.asarray(pipeline(batch, jax.random.key(key))["image"])
        return out[:, 0, 0, 0] == 3.0  # the last column moved first

    first = flipped(0, key=0)
    assert 0.45 < first.mean() < 0.55  # a fixed coin per example
    np.testing.assert_array_equal(flipped(0, key=7), first)  # not the step's key: the same every run of it
    np.testing.assert_array_equal(flipped(1, key=0), ~first)  # the other version in the next epoch
    np.testing.assert_array_equal(flipped(2, key=3), first)
    with pytest.raises(ConfigError, match="only training batches carry"):
        pipeline({"image": image}, jax.random.key(0))
    np.testing.assert_array_equal(batch_epochs(jnp.int32(2), 4, 10), [0, 0, 1, 1])  # elements 8..11 of 10 a lap
