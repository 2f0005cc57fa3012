"""Per-pixel training signal for semantic segmentation: cross-entropy, soft Dice, or their sum.

The model maps ``batch['image']`` (B, H, W, C) to logits (B, h, w, num_classes); ``batch['mask']``
(B, H, W) holds class ids. When the logits are smaller (valid-padding U-Net) the centre of the mask is
the target. Pixels labelled outside ``[0, num_classes)`` are ignored by both losses.

- ``ce``: softmax cross-entropy averaged over the counted pixels of the global batch; with
  ``class_weights`` a weighted mean (each pixel weighted by its class, divided by the sum of the
  weights, as PyTorch's ``CrossEntropyLoss(weight=...)``).
- ``dice``: ``1 - mean_c (2 sum p_c y_c + smooth) / (sum p_c + sum y_c + smooth)`` over the global
  batch, with ``p`` the softmax probabilities (Milletari et al. 2016, V-Net, multi-class form).
- ``ce_dice``: ``ce + dice_weight * dice``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo, Objective
from prism.framework.errors import ConfigError
from prism.framework.registry import OBJECTIVES
from prism.plugins.metrics.segmentation import center_crop_to, one_hot_labels

LOSSES = ("ce", "dice", "ce_dice")


@dataclass
class SegmentationLossConfig:
    """loss: ce | dice | ce_dice.
    dice_weight: weight of the Dice term in ce_dice.
    smooth: additive smoothing of the Dice ratio (keeps classes absent from a batch finite).
    class_weights: per-class weights of the cross-entropy (empty: all 1).
    """

    loss: str = field(default="ce", metadata={"choices": LOSSES})
    dice_weight: float = field(default=1.0, metadata={"ge": 0})
    smooth: float = field(default=1.0, metadata={"ge": 0})
    class_weights: list[float] = field(default_factory=list, metadata={"ge": 0})


def cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """(Weighted) mean softmax cross-entropy over the pixels whose label is a class."""
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    safe = jnp.where(valid, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    weight = valid.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * class_weights[safe]
    return jnp.sum(per_pixel * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def soft_dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1.0) -> jax.Array:
    """1 - the mean over classes of the soft Dice coefficient, over all counted pixels of the batch."""
    num_classes = logits.shape[-1]
    truth = one_hot_labels(labels, num_classes)  # ignored pixels: all-zero rows
    valid = truth.sum(-1, keepdims=True)
    probs = jax.nn.softmax(logits, axis=-1) * valid
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(probs * truth, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(truth, axis=axes)
    return 1.0 - jnp.mean((2.0 * intersection + smooth) / (denominator + smooth))


class SegmentationLoss(Objective):
    """Cross-entropy and/or soft Dice of per-pixel logits against ``batch['mask']``."""

    def __init__(self, cfg: SegmentationLossConfig, num_classes: int) -> None:
        if cfg.loss not in LOSSES:
            raise ConfigError(f"objective.loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
        if cfg.class_weights and len(cfg.class_weights) != num_classes:
            raise ConfigError(f"objective.class_weights has {len(cfg.class_weights)} values for {num_classes} "
                              f"classes; give one weight per class")
        self.loss, self.dice_weight, self.smooth = cfg.loss, cfg.dice_weight, cfg.smooth
        self.class_weights = tuple(float(w) for w in cfg.class_weights) or None

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        if "mask" not in batch:
            raise ConfigError("objective 'segmentation' needs batches with a 'mask' (a segmentation dataset such "
                              "as dataset=mask_folder)")
        logits = model(batch["image"]).astype(jnp.float32)
        labels = center_crop_to(batch["mask"], logits.shape[1], logits.shape[2])
        metrics: dict[str, jax.Array] = {}
        loss = jnp.zeros((), jnp.float32)
        if self.loss in ("ce", "ce_dice"):
            weights = None if self.class_weights is None else jnp.asarray(self.class_weights, jnp.float32)
            metrics["ce"] = cross_entropy(logits, labels, weights)
            loss = loss + metrics["ce"]
        if self.loss in ("dice", "ce_dice"):
            metrics["dice_loss"] = soft_dice_loss(logits, labels, self.smooth)
            loss = loss + (self.dice_weight if self.loss == "ce_dice" else 1.0) * metrics["dice_loss"]
        valid = (labels >= 0) & (labels < logits.shape[-1])
        correct = (logits.argmax(-1) == labels) & valid
        metrics["pixel_accuracy"] = correct.sum() / jnp.maximum(valid.sum(), 1)
        return loss, metrics


@OBJECTIVES.register("segmentation", config=SegmentationLossConfig,
                     description="Per-pixel cross-entropy, soft Dice or both (loss=ce|dice|ce_dice).")
def build_segmentation(cfg: SegmentationLossConfig, *, model: nnx.Module, data: DataInfo,
                       rngs: nnx.Rngs) -> SegmentationLoss:
    return SegmentationLoss(cfg, data.num_classes)
