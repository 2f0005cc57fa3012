"""Supervised classification: softmax cross-entropy with optional label smoothing."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo, Objective
from prism.framework.registry import OBJECTIVES


@dataclass
class SupervisedConfig:
    """label_smoothing: mass spread uniformly over all classes (0 disables)."""

    label_smoothing: float = field(default=0.0, metadata={"ge": 0, "le": 1})


class Supervised(Objective):
    """Mean cross-entropy of the model's logits against ``batch['label']``; reports accuracy too."""

    def __init__(self, cfg: SupervisedConfig, num_classes: int) -> None:
        self.label_smoothing = cfg.label_smoothing
        self.num_classes = num_classes

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        logits = model(batch["image"]).astype(jnp.float32)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], self.num_classes), self.label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, {"accuracy": accuracy}


@OBJECTIVES.register("supervised", config=SupervisedConfig, description="Softmax cross-entropy on labels.")
def build_supervised(cfg: SupervisedConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> Supervised:
    return Supervised(cfg, data.num_classes)
