"""Batched, jit-able, class-aware non-maximum suppression with a fixed number of outputs.

Greedy NMS as torchvision's ``batched_nms`` computes it (highest score first; a box suppresses the
boxes of its class whose IoU with it exceeds the threshold), written as a fixed-length loop so that it
compiles once for any batch: the ``top_k`` best (candidate, class) scores are kept, then
``max_detections`` times the best unsuppressed one is taken and its class mates overlapping it are
suppressed. Outputs are padded, with a ``valid`` mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from prism.plugins.metrics.detection import box_iou


class NMSOutput(NamedTuple):
    """(B, D, 4) boxes, (B, D) scores, (B, D) int32 classes, (B, D) bool valid; valid ones first, by score."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def _nms_one(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float, score_threshold: float, top_k: int,
             max_detections: int) -> NMSOutput:
    num_classes = scores.shape[-1]
    flat = scores.reshape(-1)
    k = min(top_k, flat.shape[0])
    cand_scores, index = jax.lax.top_k(flat, k)
    cand_boxes = boxes[index // num_classes]
    cand_classes = (index % num_classes).astype(jnp.int32)
    alive = jnp.where(cand_scores > score_threshold, cand_scores, -jnp.inf)

    def pick(i, carry):
        alive, out_index = carry
        best = jnp.argmax(alive)
        ok = jnp.isfinite(alive[best])
        out_index = out_index.at[i].set(jnp.where(ok, best, -1))
        overlap = box_iou(cand_boxes[best][None], cand_boxes)[0]
        suppress = (cand_classes == cand_classes[best]) & (overlap > iou_threshold)
        alive = jnp.where(ok & suppress, -jnp.inf, alive).at[best].set(-jnp.inf)
        return alive, out_index

    _, out_index = jax.lax.fori_loop(0, max_detections, pick, (alive, jnp.full((max_detections,), -1, jnp.int32)))
    valid = out_index >= 0
    safe = jnp.maximum(out_index, 0)
    return NMSOutput(boxes=jnp.where(valid[:, None], cand_boxes[safe], 0.0),
                     scores=jnp.where(valid, cand_scores[safe], 0.0),
                     classes=jnp.where(valid, cand_classes[safe], 0), valid=valid)


def batched_nms(boxes: jax.Array, scores: jax.Array, *, iou_threshold: float = 0.5, score_threshold: float = 0.001,
                top_k: int = 1000, max_detections: int = 100) -> NMSOutput:
    """Per-image class-aware NMS of ``boxes`` (B, N, 4) with per-class ``scores`` (B, N, C).

    Candidates are (box, class) pairs scoring above ``score_threshold``; the ``top_k`` best enter NMS,
    and at most ``max_detections`` survive per image.
    """
    return jax.vmap(lambda b, s: _nms_one(b, s, iou_threshold=iou_threshold, score_threshold=score_threshold,
                                          top_k=top_k, max_detections=max_detections))(boxes, scores)
