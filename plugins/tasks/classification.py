"""Image classification: batches of ``image`` + ``label``; top-1/top-k accuracy and loss."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from framework.api import Batch, DataInfo, Task
from framework.registry import TASKS


@dataclass
class ClassificationConfig:
    """top_k: also report top-k accuracy for this k (0 or 1 disables; capped at the class count)."""

    top_k: int = 5


class Classification(Task):
    batch_keys = ("image", "label")

    def __init__(self, cfg: ClassificationConfig, num_classes: int) -> None:
        self.top_k = min(cfg.top_k, num_classes)

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        logits = model(batch["image"]).astype(jnp.float32)
        labels = batch["label"]
        outputs = {
            "accuracy": (logits.argmax(-1) == labels).astype(jnp.float32),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, labels),
        }
        if self.top_k > 1:
            top = jax.lax.top_k(logits, self.top_k)[1]
            outputs[f"top{self.top_k}"] = (top == labels[:, None]).any(-1).astype(jnp.float32)
        return outputs


@TASKS.register("classification", config=ClassificationConfig,
                description="Image classification: accuracy, top-k accuracy and loss.")
def build_classification(cfg: ClassificationConfig, *, data: DataInfo) -> Classification:
    return Classification(cfg, data.num_classes)
