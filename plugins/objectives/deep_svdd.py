"""One-class Deep SVDD (``objective=deep_svdd``; Ruff et al. 2018, "Deep One-Class Classification", ICML).

The network phi maps the normal training data into a hypersphere of minimum volume around a fixed center c:
the loss is the mean squared distance ``||phi(x) - c||^2`` over the batch (the paper's one-class objective,
eq. 4; the weight decay term is the optimizer's, ``optimizer.weight_decay``). The anomaly score of a test
image is the same distance (``task=anomaly task.scorer=svdd``).

c is "the mean of the network representations from an initial forward pass" (section 3.3), with coordinates
closer to zero than ``eps`` pushed to +-eps as in the authors' code (a zero coordinate is trivially matched by
zero weights). Here the initial forward pass is the first training batch (step 0) rather than the whole
training set: with a batch of a few hundred images the mean is the same to within its sampling error, and it
needs no separate pass over the data. c is stored in the model (its ``center`` variable,
:class:`~prism.plugins.models.conv_autoencoder.SVDDCenter`), so checkpoints and ``prism eval`` carry it; a run
from ``model.pretrained=AE_RUN`` (the paper's autoencoder pre-training) computes it from the loaded encoder.

The paper's networks have no bias terms (a bias lets phi map everything to c); ``model=conv_autoencoder`` is
built that way. A model with biases is accepted but may collapse to a constant (the ``distance`` metric then
goes to 0 while the anomaly AUROC drops to 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Batch, DataInfo, Objective
from prism.framework.errors import ConfigError
from prism.framework.registry import OBJECTIVES


class CenteredFeatureModel(Protocol):
    """A feature model holding a hypersphere center: ``features(x)`` (batch, num_features) and ``center``
    (an ``nnx.Variable`` of shape (num_features,))."""

    num_features: int
    center: nnx.Variable

    def features(self, x: jax.Array) -> jax.Array: ...


@dataclass
class DeepSVDDConfig:
    """eps: center coordinates with |c_i| < eps are set to +-eps (the authors' code: 0.1)."""

    eps: float = field(default=0.1, metadata={"ge": 0})


def initial_center(features: jax.Array, eps: float) -> jax.Array:
    """Mean of ``features`` over the batch, coordinates within eps of zero pushed to -eps / +eps."""
    c = jnp.mean(features.astype(jnp.float32), axis=0)
    return jnp.where(jnp.abs(c) < eps, jnp.where(c < 0, -eps, eps), c)


def svdd_distances(features: jax.Array, center: jax.Array) -> jax.Array:
    """Squared distance of each feature row to the center, shape (batch,)."""
    return jnp.sum(jnp.square(features.astype(jnp.float32) - center), axis=-1)


class DeepSVDD(Objective):
    model_contract = CenteredFeatureModel
    takes_step = True

    def __init__(self, cfg: DeepSVDDConfig) -> None:
        if cfg.eps < 0:
            raise ConfigError(f"objective.eps must be >= 0, got {cfg.eps}")
        self.eps = cfg.eps

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array, *, step: jax.Array
                 ) -> tuple[jax.Array, dict]:
        z = model.features(batch["image"])
        fresh = initial_center(jax.lax.stop_gradient(z), self.eps)
        center = jnp.where(step == 0, fresh, model.center[...])
        model.center[...] = center
        distance = svdd_distances(z, jax.lax.stop_gradient(center))
        return distance.mean(), {"center_norm": jnp.linalg.norm(center)}


@OBJECTIVES.register("deep_svdd", config=DeepSVDDConfig,
                     description="One-class Deep SVDD (Ruff et al. 2018): mean squared distance to a fixed center.")
def build_deep_svdd(cfg: DeepSVDDConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> DeepSVDD:
    return DeepSVDD(cfg)
