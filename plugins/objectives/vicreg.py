"""VICReg (Bardes, Ponce & LeCun 2022, arXiv:2105.04906): variance-invariance-covariance regularization.

``sim_weight * MSE(z1, z2) + var_weight * (hinge(1 - std(z1)) + hinge(1 - std(z2)))
+ cov_weight * (off-diagonal covariance^2 of z1 and of z2, each summed and divided by the dimension)``,
with statistics over the global batch (unbiased variance and covariance, eps 1e-4 inside the square root),
as solo-learn's ``solo/losses/vicreg.py``. Defaults follow solo-learn's CIFAR recipe: weights 25/25/1,
projector 2048-2048-2048 with two hidden Linear-BN-ReLU layers. Use with ``augment=byol`` (or simclr).

This file is the template for adding a method: a config extending ``SSLConfig``, an ``SSLObjective``
subclass with ``ssl_loss``, and a registered builder; the online probe comes with the base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._ssl_common import MLP, SSLConfig, SSLObjective


@dataclass
class VICRegConfig(SSLConfig):
    """sim_weight / var_weight / cov_weight: weights of the three terms; proj_hidden_layers: hidden
    Linear-BN-ReLU layers of the projector."""

    proj_hidden_dim: int = field(default=2048, metadata={"ge": 1})
    proj_output_dim: int = field(default=2048, metadata={"ge": 1})
    proj_hidden_layers: int = field(default=2, metadata={"ge": 0})
    sim_weight: float = field(default=25.0, metadata={"ge": 0})
    var_weight: float = field(default=25.0, metadata={"ge": 0})
    cov_weight: float = field(default=1.0, metadata={"ge": 0})


def vicreg_terms(z1: jax.Array, z2: jax.Array, eps: float = 1e-4) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(invariance, variance, covariance) terms of VICReg for two (N, D) batches of projections."""
    z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
    n, d = z1.shape
    invariance = jnp.mean((z1 - z2) ** 2)
    variance = sum(jnp.mean(jax.nn.relu(1.0 - jnp.sqrt(z.var(axis=0, ddof=1) + eps))) for z in (z1, z2))
    off_diagonal = ~jnp.eye(d, dtype=bool)
    covariance = 0.0
    for z in (z1, z2):
        z = z - z.mean(axis=0)
        cov = z.T @ z / (n - 1)
        covariance = covariance + jnp.sum(jnp.where(off_diagonal, cov, 0.0) ** 2) / d
    return invariance, variance, covariance


class VICReg(SSLObjective):
    method = "vicreg"
    augment_preset = "byol"

    def __init__(self, cfg: VICRegConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        self.weights = (cfg.sim_weight, cfg.var_weight, cfg.cov_weight)
        self.projector = MLP(self.num_features, cfg.proj_hidden_dim, cfg.proj_output_dim,
                             hidden_layers=cfg.proj_hidden_layers, rngs=rngs)

    def ssl_loss(self, model, views, features, key):
        z1, z2 = (self.projector(f) for f in features)
        terms = vicreg_terms(z1, z2)
        loss = sum(w * t for w, t in zip(self.weights, terms, strict=True))
        return loss, dict(zip(("invariance", "variance", "covariance"), terms, strict=True))


@OBJECTIVES.register("vicreg", config=VICRegConfig,
                     description="VICReg: invariance + variance + covariance terms, with an online probe.")
def build_vicreg(cfg: VICRegConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> VICReg:
    return VICReg(cfg, model=model, data=data, rngs=rngs)
