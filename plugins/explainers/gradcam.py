"""Grad-CAM (Selvaraju et al. 2017): the ReLU of a layer's feature maps weighted by the spatial mean of the score's
gradient with respect to them, ``relu(sum_k mean_ij(dS/dA_kij) * A_k)``, on the layer's grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Explainer, InputSpace, TappedModel
from prism.framework.registry import EXPLAINERS
from prism.framework.taps import activation_and_gradient


@dataclass
class GradCAMConfig:
    """Grad-CAM has no settings: the layer is ``layer=NAME`` (default: the model's last tapped layer)."""


def grad_cam(activation: jax.Array, grad: jax.Array) -> jax.Array:
    """Grad-CAM maps (batch, h, w) from a layer's activation and the score's gradient, both (batch, h, w, k)."""
    weights = grad.mean(axis=(1, 2), keepdims=True)
    return jax.nn.relu((weights * activation).sum(axis=-1))


class GradCAM(Explainer):
    model_contract = TappedModel
    uses_layer = True

    def explain(self, model: nnx.Module, score: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                layer: str | None, key: jax.Array, space: InputSpace) -> jax.Array:
        _, activation, grad = activation_and_gradient(lambda: score(images), layer)
        return grad_cam(activation.astype(jnp.float32), grad.astype(jnp.float32))


@EXPLAINERS.register("gradcam", config=GradCAMConfig,
                     description="Grad-CAM: a layer's feature maps weighted by their mean score gradient (ReLU).")
def build_gradcam(cfg: GradCAMConfig) -> GradCAM:
    return GradCAM()
