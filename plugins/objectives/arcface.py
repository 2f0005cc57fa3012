"""ArcFace (Deng et al. 2019, arXiv:1801.07698): additive angular margin, target logit ``s * cos(theta + m)``.

As insightface computes it: ``cos(theta + m) = cos * cos(m) - sin * sin(m)``; where ``theta + m`` would pass
pi (the logit would rise again), the target is ``cos - m * sin(m)`` instead, which keeps it decreasing in
theta. Defaults s=64, m=0.5 as in the paper. See :mod:`plugins.objectives._margin_common` for the head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._margin_common import MarginConfig, MarginSoftmax, clipped


@dataclass
class ArcFaceConfig(MarginConfig):
    """margin: m, the angle (radians) added to the target class's angle. Head and scale: :class:`MarginConfig`."""

    margin: float = field(default=0.5, metadata={"ge": 0, "lt": math.pi / 2})


def arcface_target(cos: jax.Array, margin: float) -> jax.Array:
    """``cos(theta + m)`` for ``cos = cos(theta)``, and ``cos - m sin(m)`` where ``theta + m > pi``."""
    cos = clipped(cos)
    sin = jnp.sqrt(1.0 - cos * cos)
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    return jnp.where(cos > math.cos(math.pi - margin), shifted, cos - math.sin(margin) * margin)


class ArcFace(MarginSoftmax):
    method = "arcface"

    def __init__(self, cfg: ArcFaceConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        if not 0 <= cfg.margin < math.pi / 2:
            raise ConfigError(f"objective.margin: must be in [0, pi/2) radians, got {cfg.margin}")
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        self.margin = float(cfg.margin)

    def target(self, cos: jax.Array) -> jax.Array:
        return arcface_target(cos, self.margin)


@OBJECTIVES.register("arcface", config=ArcFaceConfig,
                     description="ArcFace: additive angular margin softmax over identities, on an embedding head.")
def build_arcface(cfg: ArcFaceConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> ArcFace:
    return ArcFace(cfg, model=model, data=data, rngs=rngs)
