"""Geometric augmentations: flips, translation, rotation, resize, random-resized-crop.

Boxes (normalized ``[ymin, xmin, ymax, xmax]``) and masks follow the image; a box pushed out of the
image is clipped, and ``box_valid`` turns False when nothing of it is left. Rotation and crops sample
the image bilinearly and the mask by nearest neighbour through one affine warp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from prism.framework.augment import EPOCH_KEY, EXAMPLE_INDEX_KEY, Example
from prism.framework.errors import ConfigError
from prism.framework.registry import TRANSFORMS
from prism.plugins.transforms._common import pair, size_hw, with_probability


# -- boxes -------------------------------------------------------------------------------------------
def _finish_boxes(example: Example, boxes: jax.Array) -> Example:
    boxes = jnp.clip(boxes, 0.0, 1.0)
    out = {**example, "boxes": boxes}
    if "box_valid" in example:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        out["box_valid"] = example["box_valid"] & (area > 0)
    return out


# -- flips ---------------------------------------------------------------------------------------------
def _flip(example: Example, axis: int) -> Example:
    out = {**example, "image": jnp.flip(example["image"], axis=axis)}
    if "mask" in example:
        out["mask"] = jnp.flip(example["mask"], axis=axis)
    if "boxes" in example:
        b = example["boxes"]
        lo, hi = (0, 2) if axis == 0 else (1, 3)
        b = b.at[:, lo].set(1.0 - example["boxes"][:, hi]).at[:, hi].set(1.0 - example["boxes"][:, lo])
        out = _finish_boxes(out, b)
    return out


@dataclass
class FlipConfig:
    """p: probability of flipping."""

    p: float = 0.5


@dataclass
class HFlipConfig(FlipConfig):
    """p: probability of flipping.

    alternate: airbench's alternating flip (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds", section 3.6): each
        training example is flipped in every other epoch, starting flipped or not by a fixed coin of its index,
        so every two epochs show both versions exactly once (``p`` is then unused). Needs the training
        batch's example index and epoch, which training batches carry.
    """

    alternate: bool = False


def _index_coin(index: jax.Array) -> jax.Array:
    """A fixed pseudo-random bit of an example index (an integer hash's top bit; no key: the same every epoch)."""
    h = index.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    return ((h ^ (h >> 13)) >> 31).astype(jnp.int32)


def _alternating_hflip(example: Example, key: jax.Array) -> Example:
    missing = [k for k in (EXAMPLE_INDEX_KEY, EPOCH_KEY) if k not in example]
    if missing:
        raise ConfigError(f"hflip alternate=true needs each example's {' and '.join(missing)}, which only training "
                          f"batches carry; use it in augment.ops (or augment.views), not at evaluation")
    flip = (_index_coin(example[EXAMPLE_INDEX_KEY]) ^ (example[EPOCH_KEY] % 2)) == 1
    flipped = _flip(example, axis=1)
    return jax.tree.map(lambda f, o: jnp.where(flip, f, o), flipped, example)


@TRANSFORMS.register("hflip", config=HFlipConfig,
                     description="Horizontal flip with probability p, or in alternate epochs (alternate=true).")
def build_hflip(cfg: HFlipConfig):
    if cfg.alternate:
        return _alternating_hflip
    return with_probability(cfg.p, lambda ex, key: _flip(ex, axis=1))


@TRANSFORMS.register("vflip", config=FlipConfig, description="Vertical flip with probability p.")
def build_vflip(cfg: FlipConfig):
    return with_probability(cfg.p, lambda ex, key: _flip(ex, axis=0))


# -- translation -----------------------------------------------------------------------------------------
#: How ``random_translate`` fills the border it pads: mirrored pixels (as numpy's 'reflect', the edge row not
#: repeated) or zeros (black before normalization; label 0 for masks).
TRANSLATE_MODES = {"reflect": "reflect", "zeros": "constant"}


@dataclass
class RandomTranslateConfig:
    """Pad by ``pad`` pixels on every side, then crop a window of the original size at a random offset.

    pad: the largest shift in pixels; each axis shifts by an integer drawn uniformly from [-pad, pad]
        (0 leaves the example unchanged).
    mode: how the padded border is filled: 'reflect' (mirrored pixels, needs pad < height and width) or
        'zeros'.
    """

    pad: int = field(default=2, metadata={"ge": 0})
    mode: str = field(default="reflect", metadata={"choices": tuple(TRANSLATE_MODES)})


def _pad_crop(array: jax.Array, pad: int, mode: str, offset: jax.Array) -> jax.Array:
    """The ``array.shape[:2]`` window at ``offset`` (y, x) of ``array`` padded by ``pad`` on both spatial axes."""
    widths = [(pad, pad), (pad, pad)] + [(0, 0)] * (array.ndim - 2)
    padded = jnp.pad(array, widths, mode=mode)
    start = [offset[0], offset[1]] + [0] * (array.ndim - 2)
    return jax.lax.dynamic_slice(padded, start, array.shape)


@TRANSFORMS.register("random_translate", config=RandomTranslateConfig,
                     description="Random shift by up to pad pixels: pad (reflect or zeros), crop back (airbench).")
def build_random_translate(cfg: RandomTranslateConfig):
    """The CIFAR translation augmentation (pad-and-random-crop, as airbench's ``batch_crop`` and the usual
    ``RandomCrop(32, padding=4)``): one offset per example, the same for its image, mask and boxes."""
    if cfg.pad < 0:
        raise ValueError(f"pad must be >= 0, got {cfg.pad}")
    if cfg.mode not in TRANSLATE_MODES:
        raise ValueError(f"mode must be one of {', '.join(TRANSLATE_MODES)}, got {cfg.mode!r}")
    pad, mode = int(cfg.pad), TRANSLATE_MODES[cfg.mode]

    def translate(example: Example, key: jax.Array) -> Example:
        if pad == 0:
            return example
        h, w = example["image"].shape[:2]
        if mode == "reflect" and pad >= min(h, w):
            raise ValueError(f"random_translate: reflect padding needs pad < height and width, got pad {pad} "
                             f"for a {h}x{w} image (use mode 'zeros')")
        offset = jax.random.randint(key, (2,), 0, 2 * pad + 1)  # window start in the padded array
        out = {**example, "image": _pad_crop(example["image"], pad, mode, offset)}
        if "mask" in example:
            out["mask"] = _pad_crop(example["mask"], pad, mode, offset)
        if "boxes" in example:  # output pixel y shows input pixel y + offset - pad
            shift = (pad - offset).astype(jnp.float32) / jnp.array([h, w], jnp.float32)
            out = _finish_boxes(out, example["boxes"] + jnp.tile(shift, 2))
        return out

    return translate


# -- affine warps ----------------------------------------------------------------------------------------
def warp(example: Example, matrix: jax.Array, out_hw: tuple[int, int]) -> Example:
    """Resample ``example`` so output pixel centre (y, x) shows input point ``matrix @ (y, x, 1)``.

    Coordinates are continuous pixel units with pixel i covering [i, i+1). Boxes are moved by the
    inverse map (corners transformed, axis-aligned envelope taken).
    """
    in_h, in_w = example["image"].shape[:2]
    out_h, out_w = out_hw
    ys, xs = jnp.meshgrid(jnp.arange(out_h) + 0.5, jnp.arange(out_w) + 0.5, indexing="ij")
    src = matrix @ jnp.stack([ys.ravel(), xs.ravel(), jnp.ones(ys.size)])
    coords = [(src[0] - 0.5).reshape(out_h, out_w), (src[1] - 0.5).reshape(out_h, out_w)]
    image = example["image"]
    channels = [map_coordinates(image[..., c], coords, order=1, mode="constant", cval=0.0)
                for c in range(image.shape[-1])]
    out = {**example, "image": jnp.stack(channels, axis=-1).astype(image.dtype)}
    if "mask" in example:
        out["mask"] = map_coordinates(example["mask"], coords, order=0, mode="constant", cval=0).astype(
            example["mask"].dtype)
    if "boxes" in example:
        inverse = jnp.linalg.inv(jnp.concatenate([matrix, jnp.array([[0.0, 0.0, 1.0]])]))[:2]
        b = example["boxes"] * jnp.array([in_h, in_w, in_h, in_w])
        corners = jnp.stack([b[:, [0, 1]], b[:, [0, 3]], b[:, [2, 1]], b[:, [2, 3]]], axis=1)  # (N, 4, 2)
        moved = jnp.einsum("ij,nkj->nki", inverse, jnp.concatenate([corners, jnp.ones_like(corners[..., :1])], -1))
        lo, hi = moved.min(axis=1), moved.max(axis=1)
        boxes = jnp.concatenate([lo, hi], axis=-1) / jnp.array([out_h, out_w, out_h, out_w])
        out = _finish_boxes(out, boxes)
    return out


def _crop_matrix(y0, x0, crop_h, crop_w, out_h: int, out_w: int) -> jax.Array:
    """Output pixel (y, x) -> input point: scale the crop window onto the output grid."""
    return jnp.array([[crop_h / out_h, 0.0, y0], [0.0, crop_w / out_w, x0]], dtype=jnp.float32)


@dataclass
class RotateConfig:
    """degrees: angle drawn uniformly from [-degrees, degrees]; p: probability of rotating."""

    degrees: float = 15.0
    p: float = 1.0


@TRANSFORMS.register("rotate", config=RotateConfig, description="Rotation about the centre by a random angle.")
def build_rotate(cfg: RotateConfig):
    def rotate(example: Example, key: jax.Array) -> Example:
        h, w = example["image"].shape[:2]
        angle = jax.random.uniform(key, minval=-cfg.degrees, maxval=cfg.degrees) * (math.pi / 180.0)
        c, s = jnp.cos(angle), jnp.sin(angle)
        cy, cx = h / 2.0, w / 2.0
        # input = R @ (output - centre) + centre
        matrix = jnp.array([[c, -s, cy - c * cy + s * cx], [s, c, cx - s * cy - c * cx]])
        return warp(example, matrix, (h, w))

    return with_probability(cfg.p, rotate)


@dataclass
class ResizeConfig:
    """size: output [height, width] (or one int for both)."""

    size: list[int] = field(default_factory=lambda: [32, 32])


@TRANSFORMS.register("resize", config=ResizeConfig, description="Resize to a fixed size (bilinear; masks nearest).")
def build_resize(cfg: ResizeConfig):
    out_h, out_w = size_hw(cfg.size)

    def resize(example: Example, key: jax.Array) -> Example:
        h, w = example["image"].shape[:2]
        return warp(example, _crop_matrix(0.0, 0.0, h, w, out_h, out_w), (out_h, out_w))

    return resize


@dataclass
class RandomResizedCropConfig:
    """Inception-style crop (as torchvision's RandomResizedCrop), resized to ``size``.

    size: output [height, width] (or one int).
    scale: range of the crop's area as a fraction of the image.
    ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    """

    size: list[int] = field(default_factory=lambda: [32, 32])
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])


@TRANSFORMS.register("random_resized_crop", config=RandomResizedCropConfig,
                     description="Random crop of random area and aspect ratio, resized (Inception/SimCLR).")
def build_random_resized_crop(cfg: RandomResizedCropConfig):
    out_h, out_w = size_hw(cfg.size)
    try:
        scale, ratio = pair(cfg.scale, "scale"), pair(cfg.ratio, "ratio")
    except ValueError as exc:
        raise ConfigError(f"random_resized_crop: {exc}") from None
    attempts = 10

    def crop(example: Example, key: jax.Array) -> Example:
        h, w = example["image"].shape[:2]
        k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
        area = h * w * jax.random.uniform(k_area, (attempts,), minval=scale[0], maxval=scale[1])
        log_r = jax.random.uniform(k_ratio, (attempts,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
        aspect = jnp.exp(log_r)
        cw, ch = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
        fits = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
        first = jnp.argmax(fits)
        # torchvision's fallback: the whole image cropped to the nearest allowed ratio, centred.
        whole_ratio = w / h
        fb_w = jnp.where(whole_ratio < ratio[0], w, jnp.where(whole_ratio > ratio[1], round(h * ratio[1]), w))
        fb_h = jnp.where(whole_ratio < ratio[0], round(w / ratio[0]), h)
        crop_w = jnp.where(fits.any(), cw[first], fb_w).astype(jnp.float32)
        crop_h = jnp.where(fits.any(), ch[first], fb_h).astype(jnp.float32)
        y0 = jnp.where(fits.any(), jnp.floor(jax.random.uniform(k_y) * (h - crop_h + 1)), (h - crop_h) // 2)
        x0 = jnp.where(fits.any(), jnp.floor(jax.random.uniform(k_x) * (w - crop_w + 1)), (w - crop_w) // 2)
        return warp(example, _crop_matrix(y0, x0, crop_h, crop_w, out_h, out_w), (out_h, out_w))

    return crop
