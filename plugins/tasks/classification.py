"""Image classification: batches of ``image`` + ``label``; top-1/top-k accuracy and loss.

Test-time augmentation (``tta``) averages the logits of several views of each evaluation image, as airbench
does (Keller Jordan's fast CIFAR-10 training): ``flip`` the image and its horizontal mirror; ``flip_translate``
additionally the mirrored pair of each of two copies shifted by one pixel diagonally (reflect padding), the
un-shifted pair weighted 1/2 and each shifted pair 1/4. Every metric (accuracy, top-k, loss) is then that of
the averaged logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import Batch, DataInfo, Task
from prism.framework.errors import ConfigError
from prism.framework.registry import METRICS, TASKS

#: Test-time augmentations of :class:`ClassificationConfig` ``tta``, cheapest first.
TTA_MODES = ("none", "flip", "flip_translate")


@dataclass
class ClassificationConfig:
    """top_k: also report top-k accuracy for this k (0 or 1 disables; capped at the class count).
    tta: test-time augmentation: 'none', 'flip' (mean logits of the image and its horizontal mirror, 2 forward
        passes) or 'flip_translate' (airbench's level 2: also the mirrored pairs of the image shifted by one
        pixel up-left and down-right, reflect-padded; 6 forward passes).
    """

    top_k: int = field(default=5, metadata={"ge": 0})
    tta: str = field(default="none", metadata={"choices": TTA_MODES})


def _mirror_logits(model: nnx.Module, images: jax.Array) -> jax.Array:
    """Mean logits of NHWC ``images`` and their horizontal mirrors."""
    return 0.5 * model(images).astype(jnp.float32) + 0.5 * model(jnp.flip(images, axis=2)).astype(jnp.float32)


def tta_logits(model: nnx.Module, images: jax.Array, tta: str) -> jax.Array:
    """The logits classification reports for NHWC ``images`` under test-time augmentation ``tta``."""
    if tta == "none":
        return model(images).astype(jnp.float32)
    logits = _mirror_logits(model, images)
    if tta == "flip":
        return logits
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    shifted = [_mirror_logits(model, padded[:, dy:dy + h, dx:dx + w]) for dy, dx in ((0, 0), (2, 2))]
    return 0.5 * logits + 0.25 * (shifted[0] + shifted[1])


class Classification(Task):
    batch_keys = ("image", "label")

    def __init__(self, cfg: ClassificationConfig, num_classes: int) -> None:
        if cfg.tta not in TTA_MODES:
            raise ConfigError(f"task.tta must be one of {', '.join(TTA_MODES)}, got {cfg.tta!r}")
        self.tta = cfg.tta
        self.metrics = {"accuracy": METRICS.build("accuracy"), "loss": METRICS.build("cross_entropy")}
        top_k = min(cfg.top_k, num_classes)
        if top_k > 1:
            self.metrics[f"top{top_k}"] = METRICS.build("top_k_accuracy", METRICS.get("top_k_accuracy").config(k=top_k))

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        logits = tta_logits(model, batch["image"], self.tta)
        return {name: metric(logits, batch["label"]) for name, metric in self.metrics.items()}

    def describe(self) -> dict[str, Any]:
        return {"tta": self.tta}


@TASKS.register("classification", config=ClassificationConfig,
                description="Image classification: accuracy, top-k accuracy and loss (optional flip/translate TTA).")
def build_classification(cfg: ClassificationConfig, *, data: DataInfo) -> Classification:
    return Classification(cfg, data.num_classes)
