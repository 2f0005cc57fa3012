"""Detection metrics: pairwise box IoU (jit-able or NumPy) and COCO-style mean average precision (host).

Boxes are ``[ymin, xmin, ymax, xmax]`` (the layout of the datasets' ``boxes`` and the transforms), in
any unit as long as both sides share it: IoU is unchanged when an axis is scaled, so normalized boxes
give the same IoU and mAP as pixels.

:func:`coco_map` follows pycocotools' ``COCOeval`` for ``iouType='bbox'`` step by step (greedy matching
of score-sorted detections to the best still-unmatched ground truth at each IoU threshold
0.50:0.05:0.95, at most ``max_dets`` detections per image and class, 101-point interpolated precision,
classes without ground truth left out of the mean); no crowd annotations and the area range 'all'.
``tests/test_detection_metrics.py`` checks it against pycocotools to 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from prism.framework.registry import METRICS

#: COCO's IoU thresholds 0.50:0.05:0.95 and recall points 0:0.01:1 (as pycocotools builds them).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)


def _xp(*arrays):
    return np if all(isinstance(a, np.ndarray | float | int) for a in arrays) else jnp


def box_area(boxes):
    """Area of ``[ymin, xmin, ymax, xmax]`` boxes (..., 4); zero for inverted boxes."""
    xp = _xp(boxes)
    return xp.maximum(boxes[..., 2] - boxes[..., 0], 0) * xp.maximum(boxes[..., 3] - boxes[..., 1], 0)


def box_iou(a, b):
    """Pairwise IoU of boxes ``a`` (..., N, 4) and ``b`` (..., M, 4) -> (..., N, M); 0 where the union is empty.

    NumPy in, NumPy out (host, float64 if given); jax arrays in, jax out (jit-able)."""
    xp = _xp(a, b)
    a, b = a[..., :, None, :], b[..., None, :, :]
    h = xp.maximum(xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]), 0)
    w = xp.maximum(xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]), 0)
    inter = h * w
    union = box_area(a) + box_area(b) - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0)


@METRICS.register("box_iou", description="Pairwise intersection-over-union of [ymin, xmin, ymax, xmax] boxes.")
def build_box_iou():
    return box_iou


def generalized_iou(a: jax.Array, b: jax.Array, eps: float = 1e-9) -> jax.Array:
    """Element-wise GIoU (Rezatofighi et al. 2019) of matching boxes ``a``, ``b`` (..., 4): IoU minus the share
    of the smallest enclosing box not covered by the union; in [-1, 1], 1 for identical boxes."""
    h = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
    w = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
    inter = h * w
    union = box_area(a) + box_area(b) - inter + eps
    hull = (jnp.maximum(a[..., 2], b[..., 2]) - jnp.minimum(a[..., 0], b[..., 0])) * (
        jnp.maximum(a[..., 3], b[..., 3]) - jnp.minimum(a[..., 1], b[..., 1])) + eps
    return inter / union - (hull - union) / hull


# -- COCO mAP ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Detections:
    """One image's detections or ground truth: boxes (N, 4), classes (N,), scores (N,) (ground truth: ones)."""

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def _match(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(T, D) bool: detection d (score order) matched at threshold t, by COCOeval.evaluateImg's greedy rule."""
    matched_dt = np.zeros((len(thresholds), ious.shape[0]), bool)
    for t, thr in enumerate(thresholds):
        gt_taken = np.zeros(ious.shape[1], bool)
        for d in range(ious.shape[0]):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(ious.shape[1]):
                if gt_taken[g] or ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m >= 0:
                gt_taken[m] = matched_dt[t, d] = True
    return matched_dt


def _interpolated_precision(tp: np.ndarray, fp: np.ndarray, n_gt: int) -> np.ndarray:
    """(T, R) precision at the recall points, from (T, D) cumulative sums (COCOeval.accumulate)."""
    out = np.zeros((tp.shape[0], len(RECALL_POINTS)))
    for t in range(tp.shape[0]):
        rc = tp[t] / n_gt
        pr = (tp[t] / (fp[t] + tp[t] + np.spacing(1))).tolist()
        for i in range(len(pr) - 1, 0, -1):  # precision envelope, from the right
            if pr[i] > pr[i - 1]:
                pr[i - 1] = pr[i]
        inds = np.searchsorted(rc, RECALL_POINTS, side="left")
        q = np.zeros(len(RECALL_POINTS))
        valid = inds < len(pr)
        q[valid] = np.asarray(pr)[inds[valid]] if len(pr) else 0.0
        out[t] = q
    return out


def coco_precision(detections: Sequence[Detections], ground_truth: Sequence[Detections], num_classes: int,
                   max_dets: int = 100) -> np.ndarray:
    """COCO's precision array (T=10, R=101, K=num_classes) for area 'all'; -1 for classes without ground truth."""
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), num_classes))
    for k in range(num_classes):
        scores, matched, n_gt = [], [], 0
        for det, gt in zip(detections, ground_truth, strict=True):
            g = gt.boxes[gt.classes == k].astype(np.float64)
            keep = det.classes == k
            d, s = det.boxes[keep].astype(np.float64), det.scores[keep].astype(np.float64)
            order = np.argsort(-s, kind="mergesort")[:max_dets]
            d, s = d[order], s[order]
            n_gt += len(g)
            if not len(d):
                continue
            scores.append(s)
            matched.append(_match(box_iou(d, g), IOU_THRESHOLDS) if len(g) else
                           np.zeros((len(IOU_THRESHOLDS), len(d)), bool))
        if n_gt == 0:
            continue
        if not scores:
            precision[:, :, k] = 0.0
            continue
        all_scores = np.concatenate(scores)
        order = np.argsort(-all_scores, kind="mergesort")
        tps = np.concatenate(matched, axis=1)[:, order]
        tp = np.cumsum(tps, axis=1).astype(float)
        fp = np.cumsum(~tps, axis=1).astype(float)
        precision[:, :, k] = _interpolated_precision(tp, fp, n_gt)
    return precision


def coco_map(detections: Sequence[Detections], ground_truth: Sequence[Detections], num_classes: int,
             max_dets: int = 100) -> dict[str, float]:
    """``map`` (AP@[.5:.95]), ``map50`` and ``map75`` as COCOeval.summarize reports them (-1 if no ground truth)."""
    precision = coco_precision(detections, ground_truth, num_classes, max_dets)

    def mean(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(np.mean(valid)) if valid.size else -1.0

    at = {round(float(t), 2): i for i, t in enumerate(IOU_THRESHOLDS)}
    return {"map": mean(precision), "map50": mean(precision[at[0.5]]), "map75": mean(precision[at[0.75]])}


@METRICS.register("coco_map", description="COCO mAP@[.5:.95], mAP@.5, mAP@.75 over a split (host, NumPy).")
def build_coco_map():
    return coco_map
