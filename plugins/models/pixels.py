"""Fixed pixel features (``model=pixels``): the image, optionally Gaussian-blurred, flattened; a linear head.

A baseline feature extractor with nothing learned: ``features(x)`` is the normalized image smoothed by a
Gaussian of standard deviation ``blur_sigma`` pixels (per channel, kernel radius ``int(4 * sigma + 0.5)``,
borders mirrored: SciPy's ``gaussian_filter`` defaults) and flattened, so kNN on it (``task=anomaly``, or
``task=knn``) is nearest neighbours in pixel space, made tolerant of one-pixel shifts by the blur. The linear
``head`` on those features makes it a multinomial logistic regression under ``objective=supervised``; the
features never change in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import MODELS


@dataclass
class PixelsConfig:
    """blur_sigma: standard deviation (pixels) of the Gaussian blur applied before flattening (0: none).
    num_classes: outputs of the linear head (0: the dataset's number of classes)."""

    blur_sigma: float = field(default=0.0, metadata={"ge": 0, "le": 10})
    num_classes: int = field(default=0, metadata={"ge": 0})


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The normalized 1-D Gaussian of ``sigma`` on ``[-r, r]``, ``r = int(4 * sigma + 0.5)`` (SciPy's truncation)."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (x / sigma) ** 2)
    return (weights / weights.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """NHWC ``x`` blurred separably along height and width, borders mirrored (``d c b a | a b c d``)."""
    if sigma <= 0:
        return x
    kernel = jnp.asarray(gaussian_kernel(sigma))
    radius = (kernel.shape[0] - 1) // 2
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = jnp.pad(x, pad, mode="symmetric")
        size = x.shape[axis]
        x = sum(kernel[i] * jax.lax.slice_in_dim(padded, i, i + size, axis=axis) for i in range(kernel.shape[0]))
    return x


class Pixels(nnx.Module):
    def __init__(self, cfg: PixelsConfig, image_shape: tuple[int, int, int], num_classes: int, *,
                 rngs: nnx.Rngs) -> None:
        self.sigma = float(cfg.blur_sigma)
        self.num_features = int(np.prod(image_shape))
        self.head = nnx.Linear(self.num_features, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The (blurred) image flattened, shape (batch, height * width * channels)."""
        return gaussian_blur(x.astype(jnp.float32), self.sigma).reshape(x.shape[0], -1)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@MODELS.register("pixels", config=PixelsConfig,
                 description="Fixed features: the (Gaussian-blurred) pixels, flattened; a linear head.")
def build_pixels(cfg: PixelsConfig, *, data: DataInfo, rngs: nnx.Rngs) -> Pixels:
    return Pixels(cfg, tuple(data.image_shape), cfg.num_classes or data.num_classes, rngs=rngs)
