"""Detection metrics and NMS against independent references: pycocotools' COCOeval for the mAP, its C IoU
for ``box_iou``, and a plain NumPy greedy NMS (per class, then merged by score) for ``batched_nms``."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism.framework.registry import METRICS
from prism.plugins.metrics.detection import Detections
from prism.plugins.tasks._nms import batched_nms

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools is in the test extra: pip install -e '.[test]'")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 120, 200  # pixels of every image; prism's boxes are normalized by them


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n pixel boxes [ymin, xmin, ymax, xmax] inside an H x W image."""
    y0, x0 = rng.uniform(0, H - 10, n), rng.uniform(0, W - 10, n)
    return np.stack([y0, x0, np.minimum(y0 + rng.uniform(4, 60, n), H), np.minimum(x0 + rng.uniform(4, 90, n), W)], 1)


def _scene(seed: int, num_classes: int = 4):
    """Images with several classes: some without ground truth, detections that are jittered ground truth
    (matched at various IoUs), duplicates, pure false positives, one image with more than 100 detections,
    a class with ground truth but no detection and a class with detections but no ground truth."""
    rng = np.random.default_rng(seed)
    truth, dets = [], []
    for image in range(7):
        n_gt = 0 if image in (0, 4) else int(rng.integers(1, 7))
        g = _random_boxes(rng, n_gt)
        gc = rng.integers(0, num_classes - 1, n_gt)  # the last class never has ground truth
        gc[gc == 2] = 1 if image % 2 else 2
        d, dc = [], []
        for box, c in zip(g, gc, strict=True):
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object (missed ones, duplicates)
                d.append(box + rng.normal(0, rng.choice([1.0, 4.0, 10.0]), 4))
                dc.append(c if rng.uniform() > 0.1 else (c + 1) % num_classes)
        n_fp = 110 if image == 3 else int(rng.integers(0, 5))
        d.extend(_random_boxes(rng, n_fp))
        dc.extend(rng.integers(0, num_classes, n_fp).tolist() if image != 3 else [1] * n_fp)
        d = np.asarray(d, np.float64).reshape(-1, 4)
        d = np.stack([d[:, 0], d[:, 1], np.maximum(d[:, 2], d[:, 0] + 0.5), np.maximum(d[:, 3], d[:, 1] + 0.5)], 1)
        truth.append((g, np.asarray(gc, int)))
        dets.append((d, np.asarray(dc, int), rng.uniform(0.01, 1.0, len(d))))
    return truth, dets


def _xywh(box) -> list[float]:
    return [float(box[1]), float(box[0]), float(box[3] - box[1]), float(box[2] - box[0])]


def _pycocotools_stats(truth, dets, num_classes: int) -> np.ndarray:
    gt = COCO()
    anns = []
    for i, (g, gc) in enumerate(truth):
        for b, c in zip(g, gc, strict=True):  # annotation ids start at 1 (COCOeval treats id 0 as unmatched)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "bbox": _xywh(b),
                         "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0})
    gt.dataset = {"images": [{"id": i + 1, "height": H, "width": W} for i in range(len(truth))],
                  "annotations": anns, "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": _xywh(b), "score": float(s)}
                   for i, (d, dc, ds) in enumerate(dets) for b, c, s in zip(d, dc, ds, strict=True)]
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def _prism_map(truth, dets, num_classes: int) -> dict[str, float]:
    scale = np.array([H, W, H, W], np.float64)
    detections = [Detections(d / scale, dc, ds) for d, dc, ds in dets]
    ground_truth = [Detections(g / scale, gc, np.ones(len(g))) for g, gc in truth]
    return METRICS.build("coco_map")(detections, ground_truth, num_classes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_map_equals_pycocotools(seed):
    truth, dets = _scene(seed)
    assert sum(len(d[0]) for d in dets) > 130 and any(len(g) == 0 for g, _ in truth)
    stats = _pycocotools_stats(truth, dets, num_classes=4)
    ours = _prism_map(truth, dets, num_classes=4)
    assert 0.05 < stats[0] < 0.95  # a scene where the matching matters
    np.testing.assert_allclose([ours["map"], ours["map50"], ours["map75"]], stats[:3], atol=1e-6, rtol=0)


def test_coco_map_perfect_empty_and_missing_cases():
    box = np.array([[0.1, 0.1, 0.5, 0.6]])
    one = [Detections(box, np.array([0]), np.array([1.0]))]
    assert _prism_map_raw(one, one) == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0}, abs=1e-12)
    nothing = [Detections(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))]
    assert _prism_map_raw(nothing, one) == {"map": 0.0, "map50": 0.0, "map75": 0.0}  # missed: AP 0
    assert _prism_map_raw(one, nothing) == {"map": -1.0, "map50": -1.0, "map75": -1.0}  # no ground truth: -1


def _prism_map_raw(dets, truth):
    return METRICS.build("coco_map")(dets, truth, 1)


def test_box_iou_equals_pycocotools_iou():
    rng = np.random.default_rng(3)
    a, b = _random_boxes(rng, 9), _random_boxes(rng, 7)
    b[0] = a[0]  # identical pair
    b[1] = [200, 300, 210, 310]  # disjoint from everything
    expected = mask_utils.iou([_xywh(x) for x in a], [_xywh(x) for x in b], [0] * len(b))
    iou = METRICS.build("box_iou")
    np.testing.assert_allclose(iou(a, b), expected, atol=1e-12)
    got = jax.jit(iou)(jnp.asarray(a / [H, W, H, W], jnp.float32), jnp.asarray(b / [H, W, H, W], jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    assert iou(a, b)[0, 0] == pytest.approx(1.0) and not iou(a, b)[:, 1].any()


def _numpy_nms(boxes, scores, iou_threshold, score_threshold, max_detections):
    """Reference: for each class, sort by score and drop boxes overlapping a kept one; merge by score."""
    kept = []
    for c in range(scores.shape[1]):
        order = [i for i in np.argsort(-scores[:, c], kind="stable") if scores[i, c] > score_threshold]
        chosen = []
        for i in order:
            if all(METRICS.build("box_iou")(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= iou_threshold for j in chosen):
                chosen.append(i)
        kept += [(scores[i, c], c, i) for i in chosen]
    kept.sort(key=lambda t: -t[0])
    return kept[:max_detections]


def test_batched_nms_equals_greedy_numpy_nms():
    rng = np.random.default_rng(4)
    batch, n, classes = 3, 60, 3
    centres = rng.uniform(0.2, 0.8, (batch, 6, 2))  # clusters of overlapping boxes
    pick = rng.integers(0, 6, (batch, n))
    c = np.take_along_axis(centres, pick[..., None], 1) + rng.normal(0, 0.03, (batch, n, 2))
    size = rng.uniform(0.05, 0.3, (batch, n, 2))
    boxes = np.concatenate([c - size / 2, c + size / 2], -1).astype(np.float32)
    scores = rng.uniform(0, 1, (batch, n, classes)).astype(np.float32) ** 3
    scores[2] = 0.0  # an image without any candidate above the threshold
    out = jax.jit(lambda b, s: batched_nms(b, s, iou_threshold=0.45, score_threshold=0.05, top_k=n * classes,
                                           max_detections=25))(boxes, scores)
    assert out.boxes.shape == (batch, 25, 4) and out.valid.shape == (batch, 25)
    for i in range(batch):
        ref = _numpy_nms(boxes[i].astype(np.float64), scores[i], 0.45, 0.05, 25)
        valid = np.asarray(out.valid[i])
        assert valid.sum() == len(ref) and valid[: len(ref)].all()  # valid ones first
        np.testing.assert_allclose(np.asarray(out.scores[i])[valid], [r[0] for r in ref], rtol=1e-6)
        assert np.asarray(out.classes[i])[valid].tolist() == [r[1] for r in ref]
        np.testing.assert_allclose(np.asarray(out.boxes[i])[valid], boxes[i][[r[2] for r in ref]], rtol=1e-6)
        assert not np.asarray(out.scores[i])[~valid].any()
    assert 5 < int(out.valid[0].sum()) <= 25 and int(out.valid[2].sum()) == 0
