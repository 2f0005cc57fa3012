"""Reconstruction (``objective=reconstruction``): the mean squared error of an autoencoder's output.

The model reconstructs its (normalized) input image: ``model.reconstruct(x)`` of the same shape
(``model=conv_autoencoder``). The loss is the per-pixel squared error averaged over pixels, channels and the
batch. For anomaly detection (``task=anomaly task.scorer=reconstruction``) the per-pixel error is the anomaly
map and its mean (or max) the image's score: an autoencoder trained on normal images only reconstructs them
better than anomalies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Batch, DataInfo, Objective
from prism.framework.registry import OBJECTIVES


class Reconstructor(Protocol):
    """A model that reconstructs its input: ``reconstruct(x)`` has the shape of ``x`` (NHWC)."""

    def reconstruct(self, x: jax.Array) -> jax.Array: ...


def error_map(images: jax.Array, reconstruction: jax.Array) -> jax.Array:
    """Per-pixel squared error averaged over the channels, shape (batch, height, width)."""
    diff = reconstruction.astype(jnp.float32) - images.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=-1)


@dataclass
class ReconstructionConfig:
    """No settings: the loss is the mean squared error."""


class Reconstruction(Objective):
    model_contract = Reconstructor

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        maps = error_map(batch["image"], model.reconstruct(batch["image"]))
        return maps.mean(), {}


@OBJECTIVES.register("reconstruction", config=ReconstructionConfig,
                     description="Autoencoder mean squared reconstruction error (anomaly maps with task=anomaly).")
def build_reconstruction(cfg: ReconstructionConfig, *, model: nnx.Module, data: DataInfo,
                         rngs: nnx.Rngs) -> Reconstruction:
    return Reconstruction()
