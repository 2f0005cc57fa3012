"""MoCo v3 (Chen, Xie & He 2021, arXiv:2104.02057): contrast a query with a momentum encoder's keys.

Online (query) network: backbone (the model) -> projector -> predictor. Momentum (key) encoder: an EMA copy
of backbone + projector (:class:`~plugins.objectives._ssl_common.MomentumEncoder`, non-``Param`` variables:
no gradient, no optimizer, carried and checkpointed in the trainer's ``state.rest``). Loss, symmetric in the
two views: ``ctr(q1, k2) + ctr(q2, k1)``, where ``ctr(q, k)`` is the cross-entropy of the logits
``q kᵀ / T`` (both l2-normalized, ``k`` detached) with each query's positive on the diagonal, times ``2T``
as in the paper's pseudo-code (algorithm 1). The other images of the batch are the negatives; there is no
queue.

Batch: inside the trainer's jitted step the views are the *global* batch (sharded over the ``data`` mesh
axis), so ``q kᵀ`` already spans every device: the keys of the whole global batch are the negatives, as
with the reference code's ``concat_all_gather``, with no gather written here.

Heads as solo-learn's ResNet recipe (and the official code for ResNet): a 2-layer projector ending in a
BatchNorm without affine parameters, and a 2-layer predictor without it (``proj_hidden_layers`` /
``pred_hidden_layers`` 1; the paper's ViT projector has 3 layers: set ``proj_hidden_layers=2``). Defaults are
solo-learn's CIFAR recipe (scripts/pretrain/cifar/mocov3.yaml): projector 4096 -> 256, predictor 4096,
temperature 0.2, momentum 0.99 -> 1.0.

The momentum ``tau`` follows the cosine schedule from ``tau_base`` to ``tau_final`` over the run's
``total_steps`` (the builder's keyword, passed by the trainer), driven by the run's training step
(``takes_step``: the core passes it). The encoder moves once per call, after the loss, towards the online
weights of that step (the reference averages after the optimizer update: a one-step lag, as in BYOL here).
Use with ``augment=byol`` (MoCo v3 uses BYOL's asymmetric augmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._ssl_common import (
    MLP,
    MomentumEncoder,
    SSLConfig,
    SSLObjective,
    check_positive,
    check_tau_schedule,
    cosine_tau,
    l2_normalize,
)


@dataclass
class MoCoV3Config(SSLConfig):
    """MoCo v3's heads, temperature and momentum schedule (defaults: solo-learn's CIFAR recipe).

    proj_hidden_layers / pred_hidden_layers: hidden Linear-BN-ReLU layers of the projector (which ends in a
        BatchNorm without affine) and of the predictor (output ``proj_output_dim``).
    temperature: softmax temperature ``T`` of the InfoNCE logits (the loss is scaled by ``2T``).
    tau_base / tau_final: momentum at the first and the last step (cosine in between).
    """

    proj_hidden_dim: int = field(default=4096, metadata={"ge": 1})
    proj_output_dim: int = field(default=256, metadata={"ge": 1})
    proj_hidden_layers: int = field(default=1, metadata={"ge": 0})
    pred_hidden_dim: int = field(default=4096, metadata={"ge": 1})
    pred_hidden_layers: int = field(default=1, metadata={"ge": 0})
    temperature: float = field(default=0.2, metadata={"gt": 0})
    tau_base: float = field(default=0.99, metadata={"ge": 0, "le": 1})
    tau_final: float = field(default=1.0, metadata={"ge": 0, "le": 1})


def infonce(q: jax.Array, k: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """MoCo v3's ``ctr(q, k)``: ``2T`` times the mean cross-entropy of ``l2n(q) l2n(k)ᵀ / T`` with row i's
    positive in column i (``k`` detached); also the fraction of queries whose positive scores highest."""
    q = l2_normalize(q.astype(jnp.float32))
    k = l2_normalize(jax.lax.stop_gradient(k).astype(jnp.float32))
    logits = q @ k.T / temperature
    positives = jnp.arange(q.shape[0])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()
    return 2.0 * temperature * loss, (logits.argmax(-1) == positives).mean()


def symmetric_infonce(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array,
                      temperature: float) -> tuple[jax.Array, jax.Array]:
    """``ctr(q1, k2) + ctr(q2, k1)`` (each view's queries against the other view's keys) and the mean of
    the two accuracies."""
    loss_12, accuracy_12 = infonce(q1, k2, temperature)
    loss_21, accuracy_21 = infonce(q2, k1, temperature)
    return loss_12 + loss_21, (accuracy_12 + accuracy_21) / 2


class MoCoV3(SSLObjective):
    method = "mocov3"
    augment_preset = "byol"
    takes_step = True

    def __init__(self, cfg: MoCoV3Config, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs,
                 total_steps: int) -> None:
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        check_positive(cfg.temperature, "temperature")
        check_tau_schedule(self.method, cfg.tau_base, cfg.tau_final, total_steps)
        self.temperature = cfg.temperature
        self.tau_base, self.tau_final, self.total_steps = cfg.tau_base, cfg.tau_final, total_steps
        self.projector = MLP(self.num_features, cfg.proj_hidden_dim, cfg.proj_output_dim,
                             hidden_layers=cfg.proj_hidden_layers, last_bn=True, rngs=rngs)
        self.predictor = MLP(cfg.proj_output_dim, cfg.pred_hidden_dim, cfg.proj_output_dim,
                             hidden_layers=cfg.pred_hidden_layers, rngs=rngs)
        self.momentum = MomentumEncoder(model, self.projector)

    def copy_model_weights(self, model: nnx.Module) -> None:
        """The momentum encoder starts as the online network (the core calls this after ``model.pretrained``)."""
        self.momentum.reset(model, self.projector)

    def tau(self, step: jax.Array | int) -> jax.Array:
        """The momentum at training step ``step`` (0-based): cosine from ``tau_base`` to ``tau_final``."""
        return cosine_tau(step, self.total_steps, self.tau_base, self.tau_final)

    def ssl_loss(self, model, views, features, key):
        q1, q2 = (self.predictor(self.projector(f)) for f in features)
        k1, k2 = self.momentum.encode(model, self.projector, views)
        loss, accuracy = symmetric_infonce(q1, q2, k1, k2, self.temperature)
        return loss, {"contrastive_accuracy": accuracy}

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array, *,
                 step: jax.Array | int) -> tuple[jax.Array, dict]:
        """The loss with the current momentum encoder, which then moves by ``tau(step)``."""
        loss, metrics = super().__call__(model, batch, key)
        tau = self.tau(step)
        self.momentum.update(model, self.projector, tau)
        return loss, {**metrics, "tau": tau}


@OBJECTIVES.register("mocov3", config=MoCoV3Config,
                     description="MoCo v3: symmetric InfoNCE against a momentum encoder (cosine tau), "
                                 "with an online probe.")
def build_mocov3(cfg: MoCoV3Config, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs,
                 total_steps: int) -> MoCoV3:
    return MoCoV3(cfg, model=model, data=data, rngs=rngs, total_steps=total_steps)
