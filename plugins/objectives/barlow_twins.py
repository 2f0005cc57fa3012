"""Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): drive the two views' cross-correlation to identity.

Each view's projections are standardized per dimension over the batch (mean 0, variance 1: a BatchNorm
without affine parameters in training mode, biased variance, eps 1e-5, as solo-learn's
``solo/losses/barlow.py``); ``C = z1ᵀ z2 / N`` is their cross-correlation and the loss is
``scale_loss * (sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2)``: the diagonal term makes the views agree,
the off-diagonal term decorrelates the dimensions (redundancy reduction).

Batch: inside the trainer's jitted step the projections are the *global* batch, so the statistics and ``C``
span every device, as the paper's single cross-correlation of the whole batch (solo-learn instead averages
per-device ``C`` computed with per-device statistics).

Defaults follow solo-learn's CIFAR recipe (scripts/pretrain/cifar/barlow.yaml): projector 2048-2048-2048
(two hidden Linear-BN-ReLU layers), ``lamb`` 0.0051, ``scale_loss`` 0.1. Use with ``augment=byol`` (the
paper uses BYOL's asymmetric augmentation).
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
class BarlowTwinsConfig(SSLConfig):
    """lamb: weight of the off-diagonal (redundancy) term; scale_loss: factor on the whole loss;
    proj_hidden_layers: hidden Linear-BN-ReLU layers of the projector."""

    proj_hidden_dim: int = field(default=2048, metadata={"ge": 1})
    proj_output_dim: int = field(default=2048, metadata={"ge": 1})
    proj_hidden_layers: int = field(default=2, metadata={"ge": 0})
    lamb: float = field(default=0.0051, metadata={"ge": 0})
    scale_loss: float = field(default=0.1, metadata={"gt": 0})


def standardize(z: jax.Array, eps: float = 1e-5) -> jax.Array:
    """``(z - mean) / sqrt(var + eps)`` per dimension over the batch (biased variance: BatchNorm's)."""
    z = z.astype(jnp.float32)
    return (z - z.mean(axis=0)) * jax.lax.rsqrt(z.var(axis=0) + eps)


def barlow_twins_loss(z1: jax.Array, z2: jax.Array, lamb: float,
                      scale_loss: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``scale_loss * (sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2)`` for the cross-correlation ``C`` of
    two (N, D) batches of projections, each standardized over the batch; also the two (unweighted) sums."""
    n, d = z1.shape
    c = standardize(z1).T @ standardize(z2) / n
    on_diagonal = jnp.sum((1.0 - jnp.diagonal(c)) ** 2)
    off_diagonal = jnp.sum(jnp.where(jnp.eye(d, dtype=bool), 0.0, c) ** 2)
    return scale_loss * (on_diagonal + lamb * off_diagonal), on_diagonal, off_diagonal


class BarlowTwins(SSLObjective):
    method = "barlow_twins"
    augment_preset = "byol"

    def __init__(self, cfg: BarlowTwinsConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        self.lamb, self.scale_loss = cfg.lamb, cfg.scale_loss
        self.projector = MLP(self.num_features, cfg.proj_hidden_dim, cfg.proj_output_dim,
                             hidden_layers=cfg.proj_hidden_layers, rngs=rngs)

    def ssl_loss(self, model, views, features, key):
        z1, z2 = (self.projector(f) for f in features)
        loss, on_diagonal, off_diagonal = barlow_twins_loss(z1, z2, self.lamb, self.scale_loss)
        return loss, {"on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


@OBJECTIVES.register("barlow_twins", config=BarlowTwinsConfig,
                     description="Barlow Twins: cross-correlation of two views to identity, with an online probe.")
def build_barlow_twins(cfg: BarlowTwinsConfig, *, model: nnx.Module, data: DataInfo,
                       rngs: nnx.Rngs) -> BarlowTwins:
    return BarlowTwins(cfg, model=model, data=data, rngs=rngs)
