"""SimCLR (Chen et al. 2020, arXiv:2002.05709): NT-Xent between the projections of two views.

The 2N projections of a batch's two views are L2-normalized; each one's positive is the other view of the
same image and its negatives are the other 2N - 2 projections. Inside the trainer's jitted step the batch
is the *global* array (sharded over the ``data`` mesh axis), so the similarity matrix spans every device:
negatives come from the whole global batch, as with SimCLR's cross-replica gathering, without code for it.

Temperature: 0.5 by default, the value of SimCLR's own CIFAR-10 command (google-research/simclr README,
``--temperature=0.5``); solo-learn's CIFAR recipe uses 0.2 (scripts/pretrain/cifar/simclr.yaml), which
the ``simclr_cifar10_resnet18`` experiment sets. Use with ``augment=simclr``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._ssl_common import MLP, SSLConfig, SSLObjective, check_positive, l2_normalize


@dataclass
class SimCLRConfig(SSLConfig):
    """temperature: softmax temperature of NT-Xent. Projector: Linear-BN-ReLU-Linear (``proj_*`` fields)."""

    temperature: float = field(default=0.5, metadata={"gt": 0})


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """NT-Xent over the 2N rows of ``[z1; z2]`` (row i of z1 and row i of z2 are positives); returns the
    mean loss over all 2N anchors and the fraction of anchors whose positive is their most similar row."""
    n = z1.shape[0]
    z = l2_normalize(jnp.concatenate([z1, z2]).astype(jnp.float32))
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -1e9, logits)  # an anchor is not its own candidate
    positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean()
    accuracy = (logits.argmax(-1) == positives).mean()
    return loss, accuracy


class SimCLR(SSLObjective):
    method = "simclr"
    augment_preset = "simclr"

    def __init__(self, cfg: SimCLRConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        check_positive(cfg.temperature, "temperature")
        self.temperature = cfg.temperature
        self.projector = MLP(self.num_features, cfg.proj_hidden_dim, cfg.proj_output_dim, rngs=rngs)

    def ssl_loss(self, model, views, features, key):
        z1, z2 = (self.projector(f) for f in features)
        loss, accuracy = nt_xent(z1, z2, self.temperature)
        return loss, {"contrastive_accuracy": accuracy}


@OBJECTIVES.register("simclr", config=SimCLRConfig,
                     description="SimCLR: NT-Xent over the global batch of two views, with an online probe.")
def build_simclr(cfg: SimCLRConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> SimCLR:
    return SimCLR(cfg, model=model, data=data, rngs=rngs)
