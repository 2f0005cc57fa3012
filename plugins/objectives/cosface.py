"""CosFace (Wang et al. 2018, arXiv:1801.09414): additive cosine margin, target logit ``s * (cos(theta) - m)``.

Defaults s=64, m=0.35 as in the paper. See :mod:`plugins.objectives._margin_common` for the head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import OBJECTIVES
from prism.plugins.objectives._margin_common import MarginConfig, MarginSoftmax


@dataclass
class CosFaceConfig(MarginConfig):
    """margin: m, subtracted from the target class's cosine. Head and scale: :class:`MarginConfig`."""

    margin: float = field(default=0.35, metadata={"ge": 0, "le": 2})


class CosFace(MarginSoftmax):
    method = "cosface"

    def __init__(self, cfg: CosFaceConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        if not 0 <= cfg.margin <= 2:
            raise ConfigError(f"objective.margin: must be in [0, 2], got {cfg.margin}")
        super().__init__(cfg, model=model, data=data, rngs=rngs)
        self.margin = float(cfg.margin)

    def target(self, cos: jax.Array) -> jax.Array:
        return cos - self.margin


@OBJECTIVES.register("cosface", config=CosFaceConfig,
                     description="CosFace: additive cosine margin softmax over identities, on an embedding head.")
def build_cosface(cfg: CosFaceConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> CosFace:
    return CosFace(cfg, model=model, data=data, rngs=rngs)
