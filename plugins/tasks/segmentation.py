"""Semantic segmentation (``task=segmentation``): batches of ``image`` + ``mask`` (per-pixel class ids).

The model returns per-pixel logits (B, h, w, num_classes); a smaller output than the mask (valid-padding
U-Net) is compared with the mask's centre. Evaluation reports, exactly over the split (per-example
confusion counts summed, ratios taken once; see :mod:`prism.plugins.metrics.segmentation`):
``pixel_accuracy``, ``pixel_error``, ``iou/<class>``, ``dice/<class>``, ``miou``, ``mdice``, and ``loss``
(per-pixel cross-entropy averaged over all counted pixels). Labels outside ``[0, num_classes)`` are
ignored. :meth:`Segmentation.render` draws predictions beside the ground truth as PNGs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw

from prism.framework.api import Batch, DataInfo, Task
from prism.framework.registry import METRICS, TASKS
from prism.plugins.metrics.segmentation import center_crop_to, summarize_confusion


@dataclass
class SegmentationConfig:
    """overlay_alpha: opacity of the class colours in rendered PNGs (class 0, the background, is not
    coloured)."""

    overlay_alpha: float = field(default=0.5, metadata={"ge": 0, "le": 1})


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: Pascal VOC's bit-interleaved colour map (class 1 is dark red)."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for c in range(num_classes):
        label, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours[c] = (r, g, b)
    return colours


def overlay(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """RGB uint8 ``image`` with every pixel of class > 0 blended with its class colour."""
    out = image.astype(np.float32)
    valid = (mask > 0) & (mask < len(colours))
    tint = colours[np.where(valid, mask, 0)].astype(np.float32)
    out[valid] = (1 - alpha) * out[valid] + alpha * tint[valid]
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if not np.issubdtype(image.dtype, np.integer):  # float images in [0, 1]
        image = np.clip(np.round(image * 255.0), 0, 255)
    image = image.astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


class Segmentation(Task):
    batch_keys = ("image", "mask")

    def __init__(self, cfg: SegmentationConfig, num_classes: int, class_names: tuple[str, ...] = ()) -> None:
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if len(class_names) == num_classes else tuple(
            str(i) for i in range(num_classes))
        self.alpha = cfg.overlay_alpha
        self.confusion = METRICS.build("confusion_matrix", METRICS.get("confusion_matrix").config(
            num_classes=num_classes))

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Per example: confusion counts (C, C), summed cross-entropy and counted pixels, and the
        predicted class map (uint8 when the classes fit) that :meth:`render` draws."""
        logits = model(batch["image"]).astype(jnp.float32)
        labels = center_crop_to(batch["mask"], logits.shape[1], logits.shape[2])
        valid = (labels >= 0) & (labels < self.num_classes)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
        prediction = logits.argmax(-1)
        return {
            "confusion": self.confusion(logits, labels),
            "ce_sum": jnp.sum(jnp.where(valid, ce, 0.0), axis=(1, 2)),
            "pixels": valid.sum(axis=(1, 2)).astype(jnp.int32),
            "prediction": prediction.astype(jnp.uint8 if self.num_classes <= 256 else jnp.int32),
        }

    def predict_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """The predicted class map of unlabelled images (``prism predict``)."""
        prediction = model(batch["image"]).astype(jnp.float32).argmax(-1)
        return {"prediction": prediction.astype(jnp.uint8 if self.num_classes <= 256 else jnp.int32)}

    def summarize(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None = None
                  ) -> dict[str, float]:
        metrics = summarize_confusion(outputs["confusion"], self.class_names)
        pixels = int(np.sum(outputs["pixels"], dtype=np.int64))
        metrics["loss"] = float(np.sum(outputs["ce_sum"], dtype=np.float64) / pixels) if pixels else float("nan")
        return metrics

    def describe(self) -> dict[str, object]:
        return {"classes": list(self.class_names), "ignored_labels": f"outside [0, {self.num_classes})",
                "summary": "exact over the split (summed confusion counts)"}

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], directory: Path
               ) -> list[Path]:
        """One PNG per example: the image with the predicted classes overlaid (left) beside the image with
        the ground truth (right). A prediction smaller than the image shows the image's centre."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        colours = palette(max(self.num_classes, 2))
        paths = []
        for i, prediction in enumerate(np.asarray(outputs["prediction"])):
            h, w = prediction.shape
            image = _as_rgb_uint8(batch["image"][i])
            top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
            image = image[top:top + h, left:left + w]
            panels = [overlay(image, prediction.astype(np.int64), colours, self.alpha)]
            if "mask" in batch:  # evaluation: ground truth beside; prism predict: the prediction alone
                truth = np.asarray(center_crop_to(np.asarray(batch["mask"][i]), h, w))
                gap = np.full((h, max(2, w // 64), 3), 255, np.uint8)
                panels += [gap, overlay(image, truth.astype(np.int64), colours, self.alpha)]
            canvas = Image.fromarray(np.concatenate(panels, axis=1))
            scale = max(1, 128 // max(h, 1))
            if scale > 1:
                canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
            captioned = Image.new("RGB", (canvas.width, canvas.height + 14), "white")
            captioned.paste(canvas, (0, 14))
            draw = ImageDraw.Draw(captioned)
            draw.text((2, 1), "prediction", fill="black")
            if len(panels) > 1:
                draw.text((canvas.width // 2 + 2, 1), "ground truth", fill="black")
            path = directory / f"{i:03d}.png"
            captioned.save(path)
            paths.append(path)
        return paths


@TASKS.register("segmentation", config=SegmentationConfig,
                description="Semantic segmentation: pixel accuracy, per-class IoU and Dice, mIoU (exact over the "
                            "split); PNG overlays.")
def build_segmentation(cfg: SegmentationConfig, *, data: DataInfo) -> Segmentation:
    return Segmentation(cfg, data.num_classes, data.class_names)
