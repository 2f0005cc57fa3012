"""Grad-CAM++ (Chattopadhyay et al. 2018): Grad-CAM with per-position weights of the positive gradients,
``alpha = g^2 / (2 g^2 + sum_ij(A) g^3)`` (the closed form for an exponential of the score, as
pytorch-grad-cam computes it), ``w_k = sum_ij alpha_kij relu(g_kij)``, map ``relu(sum_k w_k A_k)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Explainer, InputSpace, TappedModel
from prism.framework.registry import EXPLAINERS
from prism.framework.taps import activation_and_gradient

EPS = 1e-7


@dataclass
class GradCAMPPConfig:
    """Grad-CAM++ has no settings: the layer is ``layer=NAME`` (default: the model's last tapped layer)."""


def grad_cam_pp(activation: jax.Array, grad: jax.Array) -> jax.Array:
    """Grad-CAM++ maps (batch, h, w) from a layer's activation and the score's gradient, both (batch, h, w, k)."""
    g2, g3 = grad**2, grad**3
    total = activation.sum(axis=(1, 2), keepdims=True)
    alpha = g2 / (2 * g2 + total * g3 + EPS)
    alpha = jnp.where(grad != 0, alpha, 0.0)
    weights = (alpha * jax.nn.relu(grad)).sum(axis=(1, 2), keepdims=True)
    return jax.nn.relu((weights * activation).sum(axis=-1))


class GradCAMPP(Explainer):
    model_contract = TappedModel
    uses_layer = True

    def explain(self, model: nnx.Module, score: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                layer: str | None, key: jax.Array, space: InputSpace) -> jax.Array:
        _, activation, grad = activation_and_gradient(lambda: score(images), layer)
        return grad_cam_pp(activation.astype(jnp.float32), grad.astype(jnp.float32))


@EXPLAINERS.register("gradcam_pp", config=GradCAMPPConfig,
                     description="Grad-CAM++: Grad-CAM with per-position weights of the positive gradients.")
def build_gradcam_pp(cfg: GradCAMPPConfig) -> GradCAMPP:
    return GradCAMPP()
