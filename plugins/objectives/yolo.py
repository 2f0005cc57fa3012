"""The YOLOv3 loss: objectness, class and box-regression terms with anchor assignment over three scales.

Assignment (YOLOv3, Redmon & Farhadi 2018): each ground-truth box is matched to the anchor, among all
nine, whose shape (width/height IoU, both centred) fits it best, at the grid cell of that anchor's scale
holding the box centre; anchors whose shape IoU exceeds ``anchor_threshold`` are matched too (extra
positives, as ultralytics' ``iou_t``). Predictions of other anchors whose box overlaps a ground truth by
more than ``ignore_threshold`` are not pushed towards "no object".

Terms (normalized as ultralytics' YOLOv3/v5 loss, so the gains carry over): box = mean (1 - GIoU) of the
positives' decoded boxes; class = mean binary cross-entropy of their class logits (YOLOv3's independent
sigmoid classes); objectness = per-scale mean binary cross-entropy over all anchors (target 1 at the
positives), weighted by ``balance`` per scale. The model contract: a YOLO-layout model (``yolov3``):
``model(images)`` returns one (B, H/s, W/s, 3, 5 + C) map per stride in ``model.strides`` and
``model.output_anchors()`` gives each map's three (w, h) pixel anchors, ``model.anchors`` all nine.
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
from prism.plugins.metrics.detection import box_iou, generalized_iou
from prism.plugins.models.yolov3 import decode_scale

BATCH_KEYS = ("image", "boxes", "box_valid", "labels")


@dataclass
class YOLOConfig:
    """YOLOv3 loss.

    box_weight / obj_weight / cls_weight: gains of the three terms.
    balance: objectness weight of each scale, from the finest (stride 8) to the coarsest (stride 32).
    anchor_threshold: besides its best anchor, a box is assigned to every anchor whose shape IoU with it
        exceeds this (1.0: the best anchor only, as the paper).
    ignore_threshold: negatives whose predicted box has an IoU above this with a ground truth are ignored.
    """

    box_weight: float = field(default=0.05, metadata={"ge": 0})
    obj_weight: float = field(default=1.0, metadata={"ge": 0})
    cls_weight: float = field(default=0.5, metadata={"ge": 0})
    balance: list[float] = field(default_factory=lambda: [4.0, 1.0, 0.4], metadata={"ge": 0})
    anchor_threshold: float = field(default=0.2, metadata={"ge": 0, "le": 1})
    ignore_threshold: float = field(default=0.5, metadata={"ge": 0, "le": 1})


def shape_iou(wh: jax.Array, anchors: jax.Array) -> jax.Array:
    """IoU of boxes (..., 2) and anchors (A, 2) given as (w, h), both centred at the origin -> (..., A)."""
    inter = jnp.minimum(wh[..., None, 0], anchors[:, 0]) * jnp.minimum(wh[..., None, 1], anchors[:, 1])
    return inter / (wh[..., None, 0] * wh[..., None, 1] + anchors[:, 0] * anchors[:, 1] - inter)


class YOLOLoss(Objective):
    """Loss of a YOLO-layout model against padded ``boxes`` / ``box_valid`` / ``labels``."""

    def __init__(self, cfg: YOLOConfig, num_classes: int, anchors, strides, output_anchors) -> None:
        if len(cfg.balance) != 3:
            raise ConfigError(f"objective.balance needs 3 weights (strides 8, 16, 32), got {list(cfg.balance)}")
        self.weights = (cfg.box_weight, cfg.obj_weight, cfg.cls_weight)
        self.balance = tuple(float(v) for v in cfg.balance)  # strides 8, 16, 32
        self.anchor_threshold, self.ignore_threshold = cfg.anchor_threshold, cfg.ignore_threshold
        self.num_classes = num_classes
        self.anchors = tuple(tuple(float(v) for v in a) for a in anchors)
        self.strides = tuple(strides)
        self.output_anchors = tuple(tuple(tuple(float(v) for v in a) for a in group) for group in output_anchors)

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ConfigError(f"objective 'yolo' needs batches with {list(BATCH_KEYS)}; the dataset gives "
                              f"{sorted(batch)} (missing {missing}): use a detection dataset such as voc_folder")
        images = batch["image"]
        b, h, w = images.shape[:3]
        outputs = model(images)
        gt = batch["boxes"].astype(jnp.float32) * jnp.array([h, w, h, w], jnp.float32)  # pixels
        gh, gw = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
        cy, cx = (gt[..., 0] + gt[..., 2]) / 2, (gt[..., 1] + gt[..., 3]) / 2
        valid = batch["box_valid"].astype(bool) & (gh > 0) & (gw > 0)
        all_anchors = jnp.asarray(self.anchors, jnp.float32)
        fit = shape_iou(jnp.stack([gw, gh], -1), all_anchors)  # (B, G, 9)
        best = jnp.argmax(fit, axis=-1)
        is_best = jnp.arange(len(self.anchors)) == best[..., None]
        assigned = valid[..., None] & (is_best | (fit > self.anchor_threshold))
        onehot = jax.nn.one_hot(batch["labels"], self.num_classes)  # (B, G, C)
        bidx = jnp.arange(b)[:, None, None]
        box_loss = obj_loss = cls_loss = jnp.zeros((), jnp.float32)
        positives = jnp.zeros((), jnp.float32)
        for out, stride, anchors in zip(outputs, self.strides, self.output_anchors, strict=True):
            out = out.astype(jnp.float32)
            hs, ws = out.shape[1:3]
            scale = {8: 0, 16: 1, 32: 2}[stride]  # model.anchors and balance run from the finest scale
            first = 3 * scale
            pos = assigned[..., first:first + 3]  # (B, G, 3)
            n_pos = pos.sum()
            i = jnp.clip(jnp.floor(cy / stride), 0, hs - 1).astype(jnp.int32)[..., None]  # (B, G, 1)
            j = jnp.clip(jnp.floor(cx / stride), 0, ws - 1).astype(jnp.int32)[..., None]
            a = jnp.arange(3)[None, None, :]
            decoded = decode_scale(out, anchors, stride)  # (B, hs, ws, 3, 4)
            giou = generalized_iou(decoded[bidx, i, j, a], gt[:, :, None, :])  # (B, G, 3)
            box_loss += jnp.sum((1.0 - giou) * pos) / jnp.maximum(n_pos, 1)
            logits = out[bidx, i, j, a, 5:]  # (B, G, 3, C)
            cls_bce = optax.sigmoid_binary_cross_entropy(logits, jnp.broadcast_to(onehot[:, :, None], logits.shape))
            cls_loss += jnp.sum(cls_bce.mean(-1) * pos) / jnp.maximum(n_pos, 1)
            target = jnp.zeros(out.shape[:4], jnp.float32).at[bidx, i, j, a].max(pos.astype(jnp.float32))
            overlap = box_iou(jax.lax.stop_gradient(decoded).reshape(b, -1, 4), gt)  # (B, hs*ws*3, G)
            overlap = jnp.max(jnp.where(valid[:, None, :], overlap, 0.0), axis=-1, initial=0.0)
            ignore = (overlap.reshape(target.shape) > self.ignore_threshold) & (target == 0)
            obj_bce = optax.sigmoid_binary_cross_entropy(out[..., 4], target)
            obj_loss += self.balance[scale] * jnp.mean(jnp.where(ignore, 0.0, obj_bce))
            positives += n_pos
        box_w, obj_w, cls_w = self.weights
        loss = box_w * box_loss + obj_w * obj_loss + cls_w * cls_loss
        return loss, {"box_loss": box_loss, "obj_loss": obj_loss, "cls_loss": cls_loss,
                      "positives_per_image": positives / b}


@OBJECTIVES.register("yolo", config=YOLOConfig,
                     description="YOLOv3 loss: objectness, classes, GIoU boxes; anchors assigned over 3 scales.")
def build_yolo(cfg: YOLOConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> YOLOLoss:
    needed = ("anchors", "strides", "output_anchors", "num_classes")
    if not all(hasattr(model, k) for k in needed):
        raise ConfigError(f"objective 'yolo' needs a YOLO-layout model ({', '.join(needed)}); "
                          f"{type(model).__name__} is not one (use model=yolov3)")
    if sorted(model.strides) != [8, 16, 32] or len(model.anchors) != 9:
        raise ConfigError(f"objective 'yolo' expects strides 8, 16, 32 with 3 anchors each; the model has strides "
                          f"{model.strides} and {len(model.anchors)} anchors")
    return YOLOLoss(cfg, model.num_classes, model.anchors, model.strides, model.output_anchors())
