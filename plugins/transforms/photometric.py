"""Photometric augmentations on images in [0, 1]: brightness, contrast, colour jitter, grayscale,
gaussian blur, solarize, and explicit normalization. Boxes and masks are untouched.

Factors follow torchvision's definitions (brightness/contrast/saturation multiply, hue rotates), as
the SimCLR and BYOL recipes are written in those terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from prism.framework.registry import TRANSFORMS
from prism.plugins.transforms._common import with_probability

LUMA = (0.299, 0.587, 0.114)  # not a jnp constant: that would start XLA before jax.distributed


def _gray(image: jax.Array) -> jax.Array:
    """(H, W, 1) luminance of an RGB image (identity for one channel)."""
    return image if image.shape[-1] == 1 else (image[..., :3] @ jnp.asarray(LUMA))[..., None]


def _factor(key: jax.Array, strength: float) -> jax.Array:
    return jax.random.uniform(key, minval=max(0.0, 1 - strength), maxval=1 + strength)


def adjust_brightness(image, factor):
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    mean = _gray(image).mean()
    return jnp.clip((image - mean) * factor + mean, 0.0, 1.0)


def adjust_saturation(image, factor):
    if image.shape[-1] == 1:
        return image
    gray = _gray(image)
    return jnp.clip((image - gray) * factor + gray, 0.0, 1.0)


def rgb_to_hsv(rgb):
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    v, delta = maxc, maxc - minc
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return jnp.stack([h, s, v], -1)


def hsv_to_rgb(hsv):
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    r = jnp.choose(i, [v, q, p, p, t, v], mode="clip")
    g = jnp.choose(i, [t, v, v, q, p, p], mode="clip")
    b = jnp.choose(i, [p, p, t, v, v, q], mode="clip")
    return jnp.stack([r, g, b], -1)


def adjust_hue(image, shift):
    if image.shape[-1] == 1:
        return image
    hsv = rgb_to_hsv(image[..., :3])
    hsv = hsv.at[..., 0].set((hsv[..., 0] + shift) % 1.0)
    return jnp.concatenate([hsv_to_rgb(hsv), image[..., 3:]], -1)


def _map_image(fn):
    return lambda example, key: {**example, "image": fn(example["image"], key)}


@dataclass
class BrightnessConfig:
    """strength: factor drawn from [1 - strength, 1 + strength]; p: probability."""

    strength: float = 0.4
    p: float = 1.0


@TRANSFORMS.register("brightness", config=BrightnessConfig, description="Random brightness factor.")
def build_brightness(cfg: BrightnessConfig):
    return with_probability(cfg.p, _map_image(lambda img, k: adjust_brightness(img, _factor(k, cfg.strength))))


@dataclass
class ContrastConfig:
    """strength: factor drawn from [1 - strength, 1 + strength]; p: probability."""

    strength: float = 0.4
    p: float = 1.0


@TRANSFORMS.register("contrast", config=ContrastConfig, description="Random contrast factor.")
def build_contrast(cfg: ContrastConfig):
    return with_probability(cfg.p, _map_image(lambda img, k: adjust_contrast(img, _factor(k, cfg.strength))))


@dataclass
class ColorJitterConfig:
    """torchvision's ColorJitter, applied with probability p, its four adjustments in random order.

    brightness / contrast / saturation: factor from [1 - s, 1 + s]; hue: shift from [-hue, hue]
    (at most 0.5). SimCLR uses 0.8 * strength for the first three, 0.2 * strength for hue, p=0.8.
    """

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p: float = 0.8


@TRANSFORMS.register("color_jitter", config=ColorJitterConfig,
                     description="Brightness, contrast, saturation and hue jitter in random order.")
def build_color_jitter(cfg: ColorJitterConfig):
    def jitter(image: jax.Array, key: jax.Array) -> jax.Array:
        k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
        b, c, s = _factor(k_b, cfg.brightness), _factor(k_c, cfg.contrast), _factor(k_s, cfg.saturation)
        h = jax.random.uniform(k_h, minval=-cfg.hue, maxval=cfg.hue)
        ops = [lambda x: adjust_brightness(x, b), lambda x: adjust_contrast(x, c),
               lambda x: adjust_saturation(x, s), lambda x: adjust_hue(x, h)]
        for index in jax.random.permutation(k_order, 4):
            image = jax.lax.switch(index, ops, image)
        return image

    return with_probability(cfg.p, _map_image(jitter))


@dataclass
class GrayscaleConfig:
    """p: probability of replacing the image by its luminance (kept at the same channel count)."""

    p: float = 0.2


@TRANSFORMS.register("grayscale", config=GrayscaleConfig, description="Random conversion to grayscale.")
def build_grayscale(cfg: GrayscaleConfig):
    return with_probability(cfg.p, _map_image(lambda img, k: jnp.broadcast_to(_gray(img), img.shape)))


@dataclass
class GaussianBlurConfig:
    """kernel_size: odd kernel width in pixels; sigma: range sigma is drawn from; p: probability.

    SimCLR: kernel 10% of the image side, sigma in [0.1, 2.0], p=0.5 (BYOL: p=1.0 / 0.1 per view).
    """

    kernel_size: int = 3
    sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    p: float = 0.5


@TRANSFORMS.register("gaussian_blur", config=GaussianBlurConfig, description="Gaussian blur with a random sigma.")
def build_gaussian_blur(cfg: GaussianBlurConfig):
    radius = cfg.kernel_size // 2

    def blur(image: jax.Array, key: jax.Array) -> jax.Array:
        sigma = jax.random.uniform(key, minval=cfg.sigma[0], maxval=cfg.sigma[1])
        offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
        kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = kernel / kernel.sum()
        padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
        h, w = image.shape[:2]
        rows = sum(kernel[i] * padded[i : i + h] for i in range(2 * radius + 1))
        return sum(kernel[i] * rows[:, i : i + w] for i in range(2 * radius + 1))

    return with_probability(cfg.p, _map_image(blur))


@dataclass
class SolarizeConfig:
    """threshold: pixels at or above it are inverted; p: probability."""

    threshold: float = 0.5
    p: float = 0.2


@TRANSFORMS.register("solarize", config=SolarizeConfig, description="Invert pixels above a threshold.")
def build_solarize(cfg: SolarizeConfig):
    return with_probability(cfg.p, _map_image(lambda img, k: jnp.where(img >= cfg.threshold, 1.0 - img, img)))


@dataclass
class NormalizeConfig:
    """mean / std: per-channel statistics (e.g. ImageNet's for pretrained weights)."""

    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@TRANSFORMS.register("normalize", config=NormalizeConfig, description="Subtract mean, divide by std per channel.")
def build_normalize(cfg: NormalizeConfig):
    mean, std = jnp.asarray(cfg.mean), jnp.asarray(cfg.std)
    return _map_image(lambda img, k: (img - mean) / std)
