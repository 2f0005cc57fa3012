"""Pieces the explainers share: input gradients of a score and a Gaussian blur of image batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def input_gradient(score: Callable[[jax.Array], jax.Array], images: jax.Array) -> jax.Array:
    """d score / d images for each example (the scores of different examples are independent)."""
    return jax.grad(lambda x: score(x).sum())(images)


def gaussian_kernel(sigma: float) -> jax.Array:
    """A normalized 1-D Gaussian of standard deviation ``sigma`` pixels, truncated at 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(images: jax.Array, sigma: float) -> jax.Array:
    """Separable Gaussian blur of (batch, H, W, C) images, each channel apart, edges replicated."""
    if sigma <= 0:
        return images
    k = gaussian_kernel(sigma)
    r = (k.shape[0] - 1) // 2
    x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    x = sum(k[i] * x[:, i:i + h] for i in range(k.shape[0]))
    return sum(k[j] * x[:, :, j:j + w] for j in range(k.shape[0]))
