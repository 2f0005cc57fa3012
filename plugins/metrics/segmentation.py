"""Semantic-segmentation metrics: per-example confusion counts (jit-able) and exact split summaries.

IoU and Dice are ratios of pixel counts, so the mean of per-batch (or per-image) ratios is not the
split's value. The registered metric ``confusion_matrix`` therefore returns, per example, the
``(num_classes, num_classes)`` matrix of pixel counts (row: true class, column: predicted class);
a task sums them over the split and takes the ratios once, with :func:`summarize_confusion`.
Pixels whose label is outside ``[0, num_classes)`` (e.g. 255 or -1 "ignore" labels) are not counted.

Predictions smaller than their labels (a valid-padding U-Net's output is the centre of its input tile,
Ronneberger et al. 2015) are compared with the centre of the label map: :func:`center_crop_to`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from prism.framework.registry import METRICS


def center_crop_to(labels: jax.Array, height: int, width: int) -> jax.Array:
    """The central ``(height, width)`` window of ``labels`` (batch, H, W); an error if it is smaller."""
    h, w = labels.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"the model's output ({height}x{width}) is larger than the mask ({h}x{w})")
    top, left = (h - height) // 2, (w - width) // 2
    return labels[..., top:top + height, left:left + width]


def one_hot_labels(labels: jax.Array, num_classes: int) -> jax.Array:
    """One-hot float32 labels; an ignored label (outside ``[0, num_classes)``) gives an all-zero row."""
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


@dataclass
class ConfusionConfig:
    """num_classes: number of classes C (the matrix is C x C)."""

    num_classes: int = 2


@METRICS.register("confusion_matrix", config=ConfusionConfig,
                  description="Per-example (C, C) pixel counts of (true class, predicted class); sum, then ratio.")
def build_confusion_matrix(cfg: ConfusionConfig):
    num_classes = cfg.num_classes

    def confusion_matrix(logits: jax.Array, labels: jax.Array) -> jax.Array:
        """``logits`` (B, h, w, C), ``labels`` (B, H, W) -> (B, C, C) int32 counts.

        Counted as a one-hot product in float32 (exact below 2**24 pixels per image; 0/1 operands are
        exact in TF32/bf16 too), at highest precision, then cast to int32.
        """
        labels = center_crop_to(labels, logits.shape[1], logits.shape[2])
        truth = one_hot_labels(labels, num_classes).reshape(labels.shape[0], -1, num_classes)
        pred = jax.nn.one_hot(logits.argmax(-1), num_classes, dtype=jnp.float32).reshape(truth.shape)
        counts = jnp.einsum("bpi,bpj->bij", truth, pred, precision=jax.lax.Precision.HIGHEST)
        return jnp.round(counts).astype(jnp.int32)

    return confusion_matrix


def summarize_confusion(confusion: np.ndarray, class_names: Sequence[str] = ()) -> dict[str, float]:
    """Exact metrics of a split from its per-example confusion matrices (N, C, C) or their sum (C, C).

    ``pixel_accuracy`` (= 1 - ``pixel_error``, the ISBI 2012 pixel error) over all counted pixels;
    ``iou/<class>`` = TP / (TP + FP + FN) and ``dice/<class>`` = 2 TP / (2 TP + FP + FN) per class;
    ``miou`` and ``mdice`` their means over the classes present in the labels or the predictions (a
    class absent from both has no defined IoU and is left out, as in mmsegmentation/torchmetrics).
    """
    total = np.asarray(confusion, np.int64)
    if total.ndim == 3:
        total = total.sum(axis=0)
    num_classes = total.shape[0]
    names = list(class_names) if len(class_names) == num_classes else [str(i) for i in range(num_classes)]
    tp = np.diag(total).astype(np.float64)
    truth, predicted = total.sum(axis=1), total.sum(axis=0)
    union = truth + predicted - tp
    pixels = total.sum()
    accuracy = float(tp.sum() / pixels) if pixels else float("nan")
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    dice = np.where(present, 2 * tp / np.maximum(truth + predicted, 1), np.nan)
    metrics = {"pixel_accuracy": accuracy, "pixel_error": 1.0 - accuracy,
               "miou": float(iou[present].mean()) if present.any() else float("nan"),
               "mdice": float(dice[present].mean()) if present.any() else float("nan")}
    for name, i, d in zip(names, iou, dice, strict=True):
        metrics[f"iou/{name}"] = float(i)
        metrics[f"dice/{name}"] = float(d)
    return metrics
