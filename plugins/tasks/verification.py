"""Pair verification (``task=verification``): are two images of the same identity? LFW's protocol.

Each example is a pair (``image``, ``image2``, ``same``, ``fold``: the ``pairs`` split of ``identity_folder``).
Each image's embedding is the sum of the embeddings of the image and of its horizontal mirror (``flip``, as is
standard for LFW); the pair's score is the cosine similarity of the two. From the scores of the whole split:

- ``verification/accuracy`` (and ``accuracy_std``, ``threshold``): LFW's 10-fold protocol. For each fold, the
  threshold that maximizes accuracy on the other folds is applied to it (``same`` predicted when the score is
  above it; candidates: midpoints between consecutive distinct scores, plus one below and one above all of
  them; ties go to the lowest); the mean (and std) over folds of those accuracies, and the mean threshold.
  The folds are the dataset's (``fold``); with a single set the pairs are dealt into ``folds`` folds, each
  class in order.
- ``verification/auc``: area under the ROC curve (trapezoids over every distinct threshold).
- ``verification/tar_at_far``: the highest true-accept rate whose false-accept rate is at most ``far``
  (1e-3 by default; with fewer than 1/far different pairs, that means no false accept at all).
- ``verification/eer``: the equal error rate, ``(FAR + FRR) / 2`` at the ROC point where they are closest.

The embedding (``embedding``): ``objective`` reads the objective's ``embed(model, images)`` (the embedding head
of ``objective=arcface|cosface``), ``features`` the backbone's pooled ``features(x)``; ``auto`` the first that
exists. ``render`` writes ``roc.png`` (the ROC of the last evaluation, log-scaled FAR) into the run's
``predictions/``.
"""

from __future__ import annotations

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
from prism.framework.errors import ConfigError
from prism.framework.registry import TASKS
from prism.plugins.tasks._frozen import l2_normalize

log = logging.getLogger(__name__)

EMBEDDINGS = ("auto", "objective", "features")


@dataclass
class VerificationConfig:
    """flip: add the embedding of each image's horizontal mirror to its own.
    embedding: 'objective' (its embed(model, x): the margin objectives' head), 'features' (the backbone's
        pooled features) or 'auto' (objective when it has one).
    far: the false-accept rate at which ``tar_at_far`` is read.
    folds: folds of the accuracy protocol when the pairs come as a single set.
    """

    flip: bool = True
    embedding: str = field(default="auto", metadata={"choices": EMBEDDINGS})
    far: float = field(default=1e-3, metadata={"gt": 0, "lt": 1})
    folds: int = field(default=10, metadata={"ge": 2})


# -- the metrics (NumPy, on the host) ---------------------------------------------------------------------
def roc(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(false-accept rates, true-accept rates, thresholds)`` at every distinct score, from the strictest
    threshold (+inf: nothing accepted) down; a pair is accepted when its score is >= the threshold."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same).astype(bool)
    positives, negatives = same.sum(), (~same).sum()
    if positives == 0 or negatives == 0:
        raise ConfigError(f"verification needs same and different pairs, got {positives} same and {negatives} "
                          f"different")
    order = np.argsort(-scores, kind="stable")
    scores, same = scores[order], same[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # the last pair of each distinct score
    tp, fp = np.cumsum(same)[last], np.cumsum(~same)[last]
    return (np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives], np.r_[np.inf, scores[last]])


def auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC curve by the trapezoid rule."""
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def tar_at_far(far: np.ndarray, tar: np.ndarray, target: float) -> float:
    """The highest true-accept rate among ROC points with a false-accept rate <= ``target``."""
    return float(tar[far <= target].max())


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
    """``(FAR + FRR) / 2`` at the ROC point where FAR and FRR = 1 - TAR are closest."""
    frr = 1.0 - tar
    i = int(np.argmin(np.abs(far - frr)))
    return float((far[i] + frr[i]) / 2)


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The threshold of highest accuracy (``same`` predicted when score > threshold) on these pairs: candidates
    are the midpoints between consecutive distinct scores and one below and one above them all; ties: lowest."""
    values = np.unique(scores)
    candidates = np.r_[values[0] - 1.0, (values[1:] + values[:-1]) / 2, values[-1] + 1.0]
    accuracy = ((scores[None, :] > candidates[:, None]) == same[None, :].astype(bool)).mean(axis=1)
    return float(candidates[int(np.argmax(accuracy))])


def fold_ids(same: np.ndarray, fold: np.ndarray, folds: int) -> np.ndarray:
    """The dataset's folds, or (a single set) each class's pairs dealt into ``folds`` folds in order."""
    if len(np.unique(fold)) > 1:
        return np.asarray(fold)
    dealt = np.zeros(len(same), np.int64)
    for cls in (True, False):
        members = np.flatnonzero(same.astype(bool) == cls)
        dealt[members] = np.arange(len(members)) * folds // max(len(members), 1)
    return dealt


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, fold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(accuracy per fold, threshold per fold)``: LFW's protocol, each fold's threshold chosen on the others."""
    scores, same = np.asarray(scores, np.float64), np.asarray(same).astype(bool)
    accuracies, thresholds = [], []
    for k in np.unique(fold):
        test = fold == k
        t = best_threshold(scores[~test], same[~test])
        accuracies.append(float(((scores[test] > t) == same[test]).mean()))
        thresholds.append(t)
    return np.array(accuracies), np.array(thresholds)


def verification_metrics(scores: np.ndarray, same: np.ndarray, fold: np.ndarray, *, far: float = 1e-3,
                         folds: int = 10) -> dict[str, float]:
    """Every reported metric from the pairs' scores, labels and folds (see the module docstring)."""
    fold = fold_ids(np.asarray(same), np.asarray(fold), folds)
    accuracies, thresholds = kfold_accuracy(scores, same, fold)
    far_, tar = roc(scores, same)[:2]
    return {"verification/accuracy": float(accuracies.mean()), "verification/accuracy_std": float(accuracies.std()),
            "verification/threshold": float(thresholds.mean()), "verification/auc": auc(far_, tar),
            "verification/tar_at_far": tar_at_far(far_, tar, far), "verification/eer": equal_error_rate(far_, tar),
            "verification/pairs": float(len(scores))}


# -- the task --------------------------------------------------------------------------------------------
class Verification(Task):
    batch_keys = ("image", "image2", "same", "fold")
    model_contract = FeatureModel
    takes_objective = True
    extra_image_keys = ("image2",)

    def __init__(self, cfg: VerificationConfig) -> None:
        if cfg.embedding not in EMBEDDINGS:
            raise ConfigError(f"task.embedding must be one of {', '.join(EMBEDDINGS)}, got {cfg.embedding!r}")
        if not 0 < cfg.far < 1:
            raise ConfigError(f"task.far must be in (0, 1), got {cfg.far}")
        self.flip, self.embedding, self.far, self.folds = cfg.flip, cfg.embedding, cfg.far, cfg.folds
        self.last_curve: dict[str, Any] | None = None  # the ROC of the latest summarize, for render

    def _embed_fn(self, model: nnx.Module, objective: nnx.Module | None):
        embed = getattr(objective, "embed", None)
        if self.embedding == "objective" and embed is None:
            raise ConfigError(f"task.embedding=objective: objective {type(objective).__name__} has no embed(model, "
                              f"images) (arcface and cosface have); use task.embedding=features")
        if embed is not None and self.embedding != "features":
            return lambda x: embed(model, x)
        return model.features

    def embeddings(self, model: nnx.Module, objective: nnx.Module | None, images: jax.Array) -> jax.Array:
        """Embeddings of normalized images, plus those of their mirrors (``flip``), as float32 rows."""
        embed = self._embed_fn(model, objective)
        out = embed(images).astype(jnp.float32)
        if self.flip:
            out = out + embed(jnp.flip(images, axis=2)).astype(jnp.float32)
        if out.ndim != 2:
            raise ConfigError(f"task 'verification': embeddings must be (batch, dim), got shape {out.shape}")
        return out

    def eval_outputs(self, model: nnx.Module, batch: Batch, objective: nnx.Module | None = None
                     ) -> dict[str, jax.Array]:
        second = batch["image2"]  # normalized as image is (extra_image_keys)
        if second.shape != batch["image"].shape:
            raise ConfigError(f"task 'verification': image2 has shape {second.shape}, image {batch['image'].shape}")
        e1, e2 = (l2_normalize(self.embeddings(model, objective, x)) for x in (batch["image"], second))
        similarity = jax.lax.stop_gradient(jnp.sum(e1 * e2, axis=-1))
        return {"similarity": similarity, "same": batch["same"].astype(jnp.int32),
                "fold": batch["fold"].astype(jnp.int32)}

    def summarize(self, outputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        scores, same = np.asarray(outputs["similarity"], np.float64), np.asarray(outputs["same"])
        if len(scores) == 0:
            raise ConfigError("task 'verification': the evaluation split gave no pairs")
        metrics = verification_metrics(scores, same, np.asarray(outputs["fold"]), far=self.far, folds=self.folds)
        far, tar, _ = roc(scores, same)
        self.last_curve = {"far": far, "tar": tar, **metrics}
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"protocol": "LFW 10-fold: threshold chosen on the other folds; cosine similarity",
                "flip": self.flip, "embedding": self.embedding, "far": self.far}

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               directory: Path) -> list[Path]:
        """``roc.png``: the ROC curve of the latest evaluation over the whole split (FAR log-scaled)."""
        if self.last_curve is None:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        c = self.last_curve
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        accepted = c["far"][c["far"] > 0]
        floor = min(float(accepted.min()) / 2 if len(accepted) else self.far, self.far / 2)  # FAR 0 on a log axis
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.plot(np.maximum(c["far"], floor), c["tar"], lw=1.5)
        ax.axvline(self.far, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(floor, 1.0)
        ax.set_ylim(0.0, 1.01)
        ax.set_xlabel("false accept rate")
        ax.set_ylabel("true accept rate")
        ax.set_title(f"{int(c['verification/pairs'])} pairs: accuracy {c['verification/accuracy']:.2%}, "
                     f"AUC {c['verification/auc']:.4f}, EER {c['verification/eer']:.2%}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = directory / "roc.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return [path]


@TASKS.register("verification", config=VerificationConfig,
                description="Pair verification (LFW protocol): 10-fold accuracy, ROC AUC, TAR@FAR, EER; roc.png.")
def build_verification(cfg: VerificationConfig, *, data: DataInfo) -> Verification:
    return Verification(cfg)
