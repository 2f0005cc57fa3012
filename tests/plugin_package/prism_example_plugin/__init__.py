"""A complete prism plugin: the ``tiny_mlp`` model, found through the ``prism.plugins`` entry point.

Once installed, ``prism train model=tiny_mlp model.hidden=64`` trains it and ``prism list model``
shows it; no change to prism itself.
"""

import math
from dataclasses import dataclass

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import MODELS


@dataclass
class TinyMLPConfig:
    """hidden: width of the hidden layer."""

    hidden: int = 32


class TinyMLP(nnx.Module):
    """Flatten the image -> Linear(hidden) -> ReLU -> Linear(num_classes)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        return self.head(nnx.relu(self.hidden(x)))


@MODELS.register("tiny_mlp", config=TinyMLPConfig, description="Two-layer perceptron on flattened pixels.")
def build(cfg: TinyMLPConfig, *, data: DataInfo, rngs: nnx.Rngs) -> nnx.Module:
    return TinyMLP(math.prod(data.image_shape), cfg.hidden, data.num_classes, rngs=rngs)
