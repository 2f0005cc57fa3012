"""Anomaly detection (``task=anomaly``): an anomaly score per image, AUROC and AUPR against the labels.

Labels are binary, 0 normal and 1 anomaly (other values are refused): what ``dataset.one_class=K`` gives any
classification dataset (see :mod:`prism.framework.one_class`), or, for a dataset with ground-truth ``mask`` and no
``label``, whether an image's mask has any anomalous pixel. ``task.scorer`` chooses the score:

- ``knn``: the mean distance of the image's frozen features (``model.features(x)``) to its ``k`` nearest
  neighbours among the training split's (the normal examples), cosine (``1 - cos``, on L2-normalized features)
  or euclidean (``task.distance``); the kNN baseline of Bergman et al. 2020 (DN2, k=2). Features from any run:
  ``model.pretrained=RUN`` or ``prism eval checkpoint=RUN task=anomaly dataset.one_class=K``.
- ``svdd``: the squared distance of the features to the model's hypersphere center (``objective=deep_svdd``,
  Ruff et al. 2018).
- ``reconstruction``: the per-pixel squared reconstruction error (``model.reconstruct(x)``,
  ``objective=reconstruction``) is the anomaly map; the image's score is its ``mean`` or ``max``
  (``task.map_score``). With ground-truth masks the task also reports the per-pixel AUROC over every pixel of
  the split (``pixel_auroc``).

Reported: ``auroc`` (area under the ROC curve: the probability that an anomaly scores above a normal example,
ties counted one half), ``aupr`` (average precision with the anomalies as positives, as scikit-learn's
``average_precision_score``), ``aupr_normal`` (the same with the normal examples as positives and negated
scores), ``pixel_auroc`` with masks. :meth:`Anomaly.render` writes ``score_histogram.png`` (the scores of the
normal and anomalous examples of the last evaluated split) and, for maps, the first images beside their maps.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import Batch, DataInfo, FeatureModel, Task
from prism.framework.errors import ConfigError, DataError
from prism.framework.registry import TASKS
from prism.plugins.objectives.deep_svdd import CenteredFeatureModel, svdd_distances
from prism.plugins.objectives.reconstruction import Reconstructor, error_map
from prism.plugins.tasks._frozen import l2_normalize

log = logging.getLogger(__name__)

SCORERS = ("knn", "svdd", "reconstruction")
DISTANCES = ("cosine", "euclidean")
MAP_SCORES = ("mean", "max")
#: Bytes of one chunk of the (evaluation x training) distance matrix.
CHUNK_BYTES = 256 << 20


@dataclass
class AnomalyConfig:
    """scorer: 'knn' (frozen features vs the training split), 'svdd' (distance to the model's Deep SVDD center) or
        'reconstruction' (per-pixel reconstruction error map).
    k: neighbours whose mean distance is the kNN score (capped at the training split's size).
    distance: kNN distance, 'cosine' (1 - cosine similarity) or 'euclidean'.
    map_score: an image's score from its anomaly map: 'mean' or 'max' over its pixels.
    bins: bins of the score histogram.
    """

    scorer: str = field(default="knn", metadata={"choices": SCORERS})
    k: int = field(default=2, metadata={"ge": 1})
    distance: str = field(default="cosine", metadata={"choices": DISTANCES})
    map_score: str = field(default="mean", metadata={"choices": MAP_SCORES})
    bins: int = field(default=50, metadata={"ge": 2, "le": 1000})


def _binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores, np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    positives = int(np.count_nonzero(labels))
    if positives == 0 or positives == labels.size:
        raise DataError(f"anomaly metrics need normal and anomalous examples; the split has {labels.size - positives}"
                        f" normal and {positives} anomalous (check dataset.one_class and dataset.eval_split)")
    return labels != 0, scores


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (nonzero = positive): the Mann-Whitney U statistic
    over the product of the class sizes, with tied scores given their average rank."""
    from scipy.stats import rankdata

    positive, scores = _binary(labels, scores)
    ranks = rankdata(scores)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: sum over the distinct score thresholds (high to low) of the recall gained times the
    precision there (scikit-learn's ``average_precision_score``, no interpolation)."""
    positive, scores = _binary(labels, scores)
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each distinct threshold
    tp = np.cumsum(positive)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_knn(query: jax.Array, reference: jax.Array, reference_sq: jax.Array, *, k: int) -> jax.Array:
    dot = jnp.matmul(query, reference.T, precision=jax.lax.Precision.HIGHEST)
    squared = jnp.sum(query * query, axis=1, keepdims=True) - 2 * dot + reference_sq[None, :]
    neg_top, _ = jax.lax.top_k(-squared, k)  # the k smallest squared distances
    return -neg_top


def knn_scores(reference: np.ndarray, query: np.ndarray, *, k: int, distance: str = "cosine") -> np.ndarray:
    """Mean distance of each ``query`` row to its ``k`` nearest ``reference`` rows (cosine: 1 - cos similarity
    of the rows; euclidean: the L2 distance)."""
    reference, query = np.asarray(reference, np.float32), np.asarray(query, np.float32)
    if distance == "cosine":
        reference, query = (np.asarray(l2_normalize(jnp.asarray(x))) for x in (reference, query))
    k = min(k, len(reference))
    chunk = int(np.clip(CHUNK_BYTES // (4 * max(len(reference), 1)), 1, len(query)))
    reference_d = jnp.asarray(reference)
    reference_sq = jnp.sum(reference_d * reference_d, axis=1)
    out = []
    for start in range(0, len(query), chunk):
        rows = query[start:start + chunk]
        pad = chunk - len(rows)  # one compiled shape for every chunk
        if pad:
            rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.float32)])
        squared = np.asarray(_chunk_knn(jnp.asarray(rows), reference_d, reference_sq, k=k))[: chunk - pad]
        squared = np.maximum(squared.astype(np.float64), 0.0)
        out.append((squared / 2).mean(axis=1) if distance == "cosine" else np.sqrt(squared).mean(axis=1))
    return np.concatenate(out)


class Anomaly(Task):
    name = "anomaly"
    batch_keys = ("image",)

    def __init__(self, cfg: AnomalyConfig, data: DataInfo) -> None:
        for key, value, allowed in (("scorer", cfg.scorer, SCORERS), ("distance", cfg.distance, DISTANCES),
                                    ("map_score", cfg.map_score, MAP_SCORES)):
            if value not in allowed:
                raise ConfigError(f"task.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if cfg.k < 1:
            raise ConfigError(f"task.k: the number of neighbours must be >= 1, got {cfg.k}")
        self.scorer, self.k, self.distance, self.map_score, self.bins = (cfg.scorer, cfg.k, cfg.distance,
                                                                         cfg.map_score, cfg.bins)
        self.model_contract = {"knn": FeatureModel, "svdd": CenteredFeatureModel,
                               "reconstruction": Reconstructor}[cfg.scorer]
        self.reference_split = "train" if cfg.scorer == "knn" else None
        self.last_scores: tuple[np.ndarray, np.ndarray] | None = None  # (scores, labels) of the last summary

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        out: dict[str, jax.Array] = {}
        mask = batch.get("mask")
        if "label" in batch:
            out["label"] = batch["label"].astype(jnp.int32)
        elif mask is not None:
            out["label"] = (mask.reshape(mask.shape[0], -1) > 0).any(axis=1).astype(jnp.int32)
        else:
            raise ConfigError("task anomaly needs examples with a 'label' (dataset.one_class=K) or a ground-truth "
                              "'mask'")
        image = batch["image"]
        if self.scorer == "knn":
            out["features"] = jax.lax.stop_gradient(model.features(image).astype(jnp.float32))
        elif self.scorer == "svdd":
            out["score"] = svdd_distances(model.features(image), model.center[...])
        else:
            maps = error_map(image, model.reconstruct(image))
            out["map"] = maps
            out["score"] = maps.mean(axis=(1, 2)) if self.map_score == "mean" else maps.max(axis=(1, 2))
            if mask is not None:
                out["mask"] = (mask.reshape(maps.shape) > 0).astype(jnp.int32)
        return out

    def scores(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None) -> np.ndarray:
        """The anomaly score of each evaluation example."""
        if self.scorer != "knn":
            return np.asarray(outputs["score"], np.float64)
        if reference is None or len(reference.get("features", ())) == 0:
            raise ConfigError("task anomaly (scorer knn) needs the features of the training split; it gave none")
        if self.k > len(reference["features"]):
            log.warning("task.k=%d exceeds the %d training examples: using k=%d", self.k, len(reference["features"]),
                        len(reference["features"]))
        return knn_scores(reference["features"], outputs["features"], k=self.k, distance=self.distance)

    def summarize(self, outputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        labels = np.asarray(outputs["label"]).reshape(-1)
        if labels.size and not np.isin(labels, (0, 1)).all():
            raise ConfigError(f"task anomaly needs binary labels (0 normal, 1 anomaly), the evaluation split has "
                              f"{len(np.unique(labels))} label values: set dataset.one_class=K (a class index or name)")
        scores = self.scores(outputs, reference)
        self.last_scores = (scores, labels)
        metrics = {"auroc": auroc(labels, scores), "aupr": average_precision(labels, scores),
                   "aupr_normal": average_precision(labels == 0, -scores),
                   "anomaly_fraction": float(np.mean(labels != 0))}
        if "mask" in outputs:
            metrics["pixel_auroc"] = auroc(np.asarray(outputs["mask"]).reshape(-1),
                                           np.asarray(outputs["map"]).reshape(-1))
        return metrics

    def describe(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"scorer": self.scorer}
        if self.scorer == "knn":
            settings.update(k=self.k, distance=self.distance, reference_split="train (the normal class only)")
        if self.scorer == "reconstruction":
            settings["map_score"] = self.map_score
        return settings

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        if self.last_scores is not None:
            written.append(write_histogram(*self.last_scores, directory / "score_histogram.png", bins=self.bins,
                                           title=f"{self.scorer} anomaly scores"))
        if "map" in outputs:
            written.append(write_maps(np.asarray(batch["image"]), np.asarray(outputs["map"]),
                                      directory / "anomaly_maps.png"))
        return written


def write_histogram(scores: np.ndarray, labels: np.ndarray, path: Path, *, bins: int = 50, title: str = "") -> Path:
    """Overlaid histograms of the scores of the normal (label 0) and anomalous examples, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.histogram_bin_edges(scores, bins=bins)
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, name in ((0, "normal"), (1, "anomaly")):
        part = scores[(labels != 0) == bool(value)]
        ax.hist(part, bins=edges, alpha=0.55, density=True, label=f"{name} ({len(part)})")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_maps(images: np.ndarray, maps: np.ndarray, path: Path) -> Path:
    """A PNG with one row per image: the image, its anomaly map (scaled to the largest value shown)."""
    from PIL import Image

    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    gray = images if images.shape[-1] == 1 else images[..., :3].mean(axis=-1, keepdims=True)
    gray = gray[..., 0].astype(np.float32)
    scaled = maps / max(float(maps.max()), 1e-12)
    rows = [np.concatenate([g / max(float(g.max()), 1e-12), m], axis=1) for g, m in zip(gray, scaled, strict=True)]
    picture = np.clip(np.concatenate(rows, axis=0) * 255, 0, 255).astype(np.uint8)
    scale = max(1, 128 // picture.shape[1])
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)
    return path


@TASKS.register("anomaly", config=AnomalyConfig,
                description="Anomaly detection: AUROC, AUPR (+ per-pixel AUROC with masks) of kNN, SVDD or "
                            "reconstruction scores.")
def build_anomaly(cfg: AnomalyConfig, *, data: DataInfo) -> Anomaly:
    return Anomaly(cfg, data)
