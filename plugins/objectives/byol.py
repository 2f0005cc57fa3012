"""BYOL (Grill et al. 2020, arXiv:2006.07733): predict a momentum target's projection of the other view.

Online network: backbone (the model) -> projector -> predictor. Target network: an exponential moving
average of backbone + projector, held as :class:`~plugins.objectives._ssl_common.EMATarget` variables
(not parameters: no gradient, no optimizer, carried and checkpointed in the trainer's ``state.rest``).
Loss: ``2 - 2 cos(p_1, sg(z'_2)) + 2 - 2 cos(p_2, sg(z'_1))``, symmetric in the two views.

The decay ``tau`` follows BYOL's cosine schedule from ``tau_base`` to ``tau_final`` over the run
(``total_steps``, passed by the trainer: the number of training batches). The target moves once per call,
after the loss, towards the online weights of that step (the weights the gradient is taken at; BYOL's
reference code averages the weights after the optimizer update, one step later: a one-step lag). With
``train.grad_accum_steps > 1`` it moves once per micro-batch. Use with ``augment=byol``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._ssl_common import (
    MLP,
    EMAStep,
    MomentumCopy,
    SSLConfig,
    SSLObjective,
    check_tau_schedule,
    cosine_tau,
    l2_normalize,
)


@dataclass
class BYOLConfig(SSLConfig):
    """BYOL's sizes (paper: projector 4096 -> 256, predictor 4096) and its target decay schedule.

    pred_hidden_dim: hidden width of the predictor (Linear-BN-ReLU-Linear, output ``proj_output_dim``).
    tau_base / tau_final: target decay at the first and the last step (cosine in between); 0.996 -> 1 as
        in the paper (solo-learn's CIFAR recipe starts at 0.99).
    """

    proj_hidden_dim: int = field(default=4096, metadata={"ge": 1})
    proj_output_dim: int = field(default=256, metadata={"ge": 1})
    pred_hidden_dim: int = field(default=4096, metadata={"ge": 1})
    tau_base: float = field(default=0.996, metadata={"ge": 0, "le": 1})
    tau_final: float = field(default=1.0, metadata={"ge": 0, "le": 1})


def byol_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """Mean over the batch of ``2 - 2 cos(p, z)`` (``z`` is the target projection, already detached)."""
    cos = jnp.sum(l2_normalize(p.astype(jnp.float32)) * l2_normalize(z.astype(jnp.float32)), axis=-1)
    return jnp.mean(2.0 - 2.0 * cos)


def symmetric_byol_loss(p1: jax.Array, p2: jax.Array, t1: jax.Array, t2: jax.Array) -> jax.Array:
    """Each view's prediction against the target projection of the other view, summed."""
    return byol_loss(p1, t2) + byol_loss(p2, t1)


class BYOL(SSLObjective):
    method = "byol"
    augment_preset = "byol"

    def __init__(self, cfg: BYOLConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs,
                 total_steps: int) -> None:
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        check_tau_schedule(self.method, cfg.tau_base, cfg.tau_final, total_steps)
        self.tau_base, self.tau_final, self.total_steps = cfg.tau_base, cfg.tau_final, total_steps
        self.projector = MLP(self.num_features, cfg.proj_hidden_dim, cfg.proj_output_dim, rngs=rngs)
        self.predictor = MLP(cfg.proj_output_dim, cfg.pred_hidden_dim, cfg.proj_output_dim, rngs=rngs)
        self.target_backbone = MomentumCopy(model)
        self.target_projector = MomentumCopy(self.projector)
        self.ema_step = EMAStep(jnp.zeros((), jnp.int32))

    def copy_model_weights(self, model: nnx.Module) -> None:
        """The target starts as the online network (the core calls this after ``model.pretrained``)."""
        self.target_backbone.reset(model)
        self.target_projector.reset(self.projector)

    def tau(self) -> jax.Array:
        return cosine_tau(self.ema_step[...], self.total_steps, self.tau_base, self.tau_final)

    def ssl_loss(self, model, views, features, key):
        z1, z2 = (self.projector(f) for f in features)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        backbone, projector = self.target_backbone.module(model), self.target_projector.module(self.projector)
        t1, t2 = (jax.lax.stop_gradient(projector(backbone.features(v))) for v in views)
        loss = symmetric_byol_loss(p1, p2, t1, t2)
        tau = self.tau()
        self.target_backbone.update(model, tau)
        self.target_projector.update(self.projector, tau)
        self.ema_step[...] = self.ema_step[...] + 1
        z_std = sum(l2_normalize(z.astype(jnp.float32)).std(axis=0).mean() for z in (z1, z2)) / 2  # ~0: collapse
        return loss, {"tau": tau, "z_std": z_std}


@OBJECTIVES.register("byol", config=BYOLConfig,
                     description="BYOL: predictor against an EMA target (cosine tau), with an online probe.")
def build_byol(cfg: BYOLConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs, total_steps: int) -> BYOL:
    return BYOL(cfg, model=model, data=data, rngs=rngs, total_steps=total_steps)
