"""Image classification: batches of ``image`` + ``label``; top-1/top-k accuracy and loss."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Batch, DataInfo, Task
from prism.framework.registry import METRICS, TASKS


@dataclass
class ClassificationConfig:
    """top_k: also report top-k accuracy for this k (0 or 1 disables; capped at the class count)."""

    top_k: int = 5


class Classification(Task):
    batch_keys = ("image", "label")

    def __init__(self, cfg: ClassificationConfig, num_classes: int) -> None:
        self.metrics = {"accuracy": METRICS.build("accuracy"), "loss": METRICS.build("cross_entropy")}
        top_k = min(cfg.top_k, num_classes)
        if top_k > 1:
            self.metrics[f"top{top_k}"] = METRICS.build("top_k_accuracy", METRICS.get("top_k_accuracy").config(k=top_k))

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        logits = model(batch["image"]).astype(jnp.float32)
        return {name: metric(logits, batch["label"]) for name, metric in self.metrics.items()}


@TASKS.register("classification", config=ClassificationConfig,
                description="Image classification: accuracy, top-k accuracy and loss.")
def build_classification(cfg: ClassificationConfig, *, data: DataInfo) -> Classification:
    return Classification(cfg, data.num_classes)
