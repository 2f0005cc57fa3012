"""Object detection: batches of ``image`` + padded ``boxes`` / ``box_valid`` / ``labels``; COCO mAP.

The model contract: ``model.detect(images) -> (boxes, scores)``, every candidate's box (B, N, 4)
normalized ``[ymin, xmin, ymax, xmax]`` and its per-class scores (B, N, C) (the ``yolov3`` model has it).
Evaluation runs batched NMS under jit (fixed ``max_detections`` per image, padded with a valid mask) and
passes detections and ground truth to :meth:`Detection.summarize`, which computes COCO's mAP@[.5:.95],
mAP@.5 and mAP@.75 over the whole split on the host (:func:`prism.plugins.metrics.detection.coco_map`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from prism.framework.api import Batch, DataInfo, Detector, Task
from prism.framework.errors import ConfigError
from prism.framework.registry import METRICS, TASKS
from prism.plugins.metrics.detection import Detections
from prism.plugins.tasks._nms import batched_nms

GT_COLOUR = (0, 220, 0)
PRED_COLOUR = (255, 40, 40)


@dataclass
class DetectionConfig:
    """Detection evaluation.

    score_threshold: candidates scoring below it are dropped before NMS (0.001: COCO-style evaluation).
    iou_threshold: NMS suppresses a box overlapping a better one of its class by more than this IoU.
    top_k: best (candidate, class) pairs entering NMS per image.
    max_detections: detections kept per image (COCO's maxDets = 100).
    render_threshold: rendered images show predictions scoring at least this.
    """

    score_threshold: float = field(default=0.001, metadata={"ge": 0, "le": 1})
    iou_threshold: float = field(default=0.6, metadata={"ge": 0, "le": 1})
    top_k: int = field(default=1000, metadata={"ge": 1})
    max_detections: int = field(default=100, metadata={"ge": 1})
    render_threshold: float = field(default=0.25, metadata={"ge": 0, "le": 1})


class Detection(Task):
    batch_keys = ("image", "boxes", "box_valid", "labels")
    model_contract = Detector

    def __init__(self, cfg: DetectionConfig, info: DataInfo) -> None:
        if cfg.max_detections < 1 or cfg.top_k < 1:
            raise ConfigError(f"task.max_detections and task.top_k must be >= 1, got {cfg.max_detections}, "
                              f"{cfg.top_k}")
        if not 0 <= cfg.iou_threshold <= 1:
            raise ConfigError(f"task.iou_threshold must be in [0, 1], got {cfg.iou_threshold}")
        self.cfg = cfg
        self.num_classes = info.num_classes
        self.class_names = tuple(info.class_names) or tuple(str(i) for i in range(info.num_classes))
        self.map = METRICS.build("coco_map")

    # -- under jit --------------------------------------------------------------------------------------
    def predict_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        boxes, scores = model.detect(batch["image"])
        out = batched_nms(jnp.clip(boxes.astype(jnp.float32), 0.0, 1.0), scores.astype(jnp.float32),
                          iou_threshold=self.cfg.iou_threshold, score_threshold=self.cfg.score_threshold,
                          top_k=self.cfg.top_k, max_detections=self.cfg.max_detections)
        return {"pred_boxes": out.boxes, "pred_scores": out.scores, "pred_classes": out.classes,
                "pred_valid": out.valid}

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        return {**self.predict_outputs(model, batch), "gt_boxes": batch["boxes"], "gt_valid": batch["box_valid"],
                "gt_labels": batch["labels"]}

    # -- on the host --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What the mAP numbers are: COCO protocol and the NMS that produced the detections."""
        return {"protocol": "COCO bbox, IoU 0.50:0.05:0.95, 101-point interpolation, area all",
                "max_detections": self.cfg.max_detections, "score_threshold": self.cfg.score_threshold,
                "nms_iou_threshold": self.cfg.iou_threshold, "top_k": self.cfg.top_k}

    def summarize(self, outputs: Mapping[str, np.ndarray], reference: Any = None) -> dict[str, float]:
        detections = [Detections(b[v], c[v], s[v]) for b, s, c, v in zip(
            outputs["pred_boxes"], outputs["pred_scores"], outputs["pred_classes"], outputs["pred_valid"],
            strict=True)]
        truth = [Detections(b[v], c[v], np.ones(int(v.sum()))) for b, c, v in zip(
            outputs["gt_boxes"], outputs["gt_labels"], outputs["gt_valid"].astype(bool), strict=True)]
        metrics = self.map(detections, truth, self.num_classes, max_dets=self.cfg.max_detections)
        metrics["detections_per_image"] = float(np.mean(outputs["pred_valid"].sum(-1))) if len(detections) else 0.0
        return metrics

    def prediction_record(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> dict:
        """One image's detections in the input image's pixels: ``[xmin, ymin, xmax, ymax]``, score, class."""
        h, w = image_size
        keep = np.asarray(outputs["pred_valid"], bool)
        return {"detections": [
            {"box_xyxy": [float(b[1] * w), float(b[0] * h), float(b[3] * w), float(b[2] * h)],
             "score": float(s), "label": int(c), "class": self.class_names[int(c)]}
            for b, s, c in zip(outputs["pred_boxes"][keep], outputs["pred_scores"][keep],
                               outputs["pred_classes"][keep], strict=True)]}

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], directory: Path) -> list[Path]:
        """PNGs of the batch's images with ground-truth boxes (green) and predictions scoring at least
        ``render_threshold`` (red, with class and score)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        names = batch.get("filename")
        for i, image in enumerate(np.asarray(batch["image"])):
            image = image[..., 0] if image.shape[-1] == 1 else image
            canvas = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
            h, w = canvas.height, canvas.width
            draw = ImageDraw.Draw(canvas)
            if "boxes" in batch and "box_valid" in batch:
                for box in np.asarray(batch["boxes"][i])[np.asarray(batch["box_valid"][i], bool)]:
                    draw.rectangle(_pixels(box, h, w), outline=GT_COLOUR, width=2)
            for box, score, cls, ok in zip(outputs["pred_boxes"][i], outputs["pred_scores"][i],
                                           outputs["pred_classes"][i], outputs["pred_valid"][i], strict=True):
                if not ok or score < self.cfg.render_threshold:
                    continue
                rect = _pixels(box, h, w)
                draw.rectangle(rect, outline=PRED_COLOUR, width=2)
                draw.text((rect[0] + 2, rect[1] + 1), f"{self.class_names[int(cls)]} {score:.2f}", fill=PRED_COLOUR)
            stem = Path(str(names[i])).stem if names is not None else f"{i:03d}"
            path = directory / f"{stem}.png"
            canvas.save(path)
            written.append(path)
        return written


def _pixels(box: np.ndarray, h: int, w: int) -> list[float]:
    """Normalized ``[ymin, xmin, ymax, xmax]`` -> PIL's ``[x0, y0, x1, y1]`` pixels."""
    return [float(box[1] * w), float(box[0] * h), float(box[3] * w), float(box[2] * h)]


@TASKS.register("detection", config=DetectionConfig,
                description="Object detection: batched NMS, COCO mAP@[.5:.95], mAP@.5, mAP@.75.")
def build_detection(cfg: DetectionConfig, *, data: DataInfo) -> Detection:
    return Detection(cfg, data)
