"""SmoothGrad (Smilkov et al. 2017): the magnitude of the score's input gradient averaged over ``samples`` noisy
copies of the image, ``mean_n sum_c |dS/dx_c(x + N(0, sigma^2))|``, with sigma ``noise`` times the input's range
(white minus black, per channel)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Explainer, InputSpace
from prism.framework.registry import EXPLAINERS
from prism.plugins.explainers._common import input_gradient


@dataclass
class SmoothGradConfig:
    """samples: noisy copies averaged.
    noise: noise standard deviation as a fraction of the input range (0.1-0.2 in the paper).
    """

    samples: int = field(default=32, metadata={"ge": 1})
    noise: float = field(default=0.15, metadata={"ge": 0})


class SmoothGrad(Explainer):
    def __init__(self, cfg: SmoothGradConfig) -> None:
        self.cfg = cfg

    def explain(self, model: nnx.Module, score: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                layer: str | None, key: jax.Array, space: InputSpace) -> jax.Array:
        sigma = self.cfg.noise * (jnp.asarray(space.white) - jnp.asarray(space.black)).astype(images.dtype)

        def body(i, total):
            noise = jax.random.normal(jax.random.fold_in(key, i), images.shape, images.dtype) * sigma
            return total + jnp.abs(input_gradient(score, images + noise)).sum(axis=-1)

        total = jax.lax.fori_loop(0, self.cfg.samples, body, jnp.zeros(images.shape[:3], images.dtype))
        return total / self.cfg.samples

    def describe(self) -> dict:
        return {"samples": self.cfg.samples, "noise": self.cfg.noise}


@EXPLAINERS.register("smoothgrad", config=SmoothGradConfig,
                     description="SmoothGrad: input-gradient magnitude averaged over noisy copies of the image.")
def build_smoothgrad(cfg: SmoothGradConfig) -> SmoothGrad:
    return SmoothGrad(cfg)
