"""What the margin-softmax objectives share (private to ``plugins/objectives``): the embedding head, the
normalized class centres, and the loss with a margin on the target class's logit.

ArcFace (Deng et al. 2019, arXiv:1801.07698) and CosFace (Wang et al. 2018, arXiv:1801.09414) train an
embedding for open-set comparison (face verification) as a classifier over the training identities: the
embedding ``e`` and each class centre ``w_j`` are L2-normalized, the logit of class j is ``s * cos(theta_j)``,
and the target class's logit is made harder by a margin (ArcFace: ``s * cos(theta_y + m)``; CosFace:
``s * (cos(theta_y) - m)``). Only the margin differs: a method is a :meth:`MarginSoftmax.target` and a
registered builder.

The embedding is ``head(model.features(x))``: Linear (no bias) then BatchNorm without scale (insightface's
``fc`` + ``features`` BatchNorm1d with its weight frozen at 1), ``embedding_dim`` wide, on any backbone that
exposes ``features`` (:class:`~prism.framework.api.FeatureModel`). :meth:`MarginSoftmax.embed` is what a task
that evaluates embeddings reads (``task=verification``). Evaluation adds ``identification/top1`` when the
evaluation split is labelled with the training identities (closed set): the class whose centre is most similar.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo, FeatureModel, Objective
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm
from prism.plugins.objectives._ssl_common import l2_normalize, num_features_of

#: cos(theta) is clipped to [-1 + EPS, 1 - EPS] before the angle is taken (the gradient of arccos is infinite at 1).
EPS = 1e-6


@dataclass
class MarginConfig:
    """embedding_dim: width of the embedding head's output.
    scale: s, the norm the logits are scaled to (64 in both papers; ~30 suits a few dozen classes).
    """

    embedding_dim: int = field(default=128, metadata={"ge": 1})
    scale: float = field(default=64.0, metadata={"gt": 0})


class EmbeddingHead(nnx.Module):
    """Linear (no bias) -> BatchNorm (bias, no scale): the embedding on top of the pooled backbone features."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(in_dim, out_dim, use_bias=False, rngs=rngs)
        self.norm = BatchNorm(out_dim, use_scale=False, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.norm(self.linear(features))


def cosines(embeddings: jax.Array, centers: jax.Array) -> jax.Array:
    """``(batch, classes)`` cosine similarities of embedding rows and class-centre columns (``(dim, classes)``)."""
    e = l2_normalize(embeddings.astype(jnp.float32))
    w = l2_normalize(centers.astype(jnp.float32).T)
    return jnp.matmul(e, w.T, precision=jax.lax.Precision.HIGHEST)


def margin_logits(cos: jax.Array, labels: jax.Array, target_fn, scale: float) -> jax.Array:
    """``scale * cos`` with the target class's entry replaced by ``scale * target_fn(cos_target)``."""
    onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=bool)
    return scale * jnp.where(onehot, target_fn(cos), cos)


class MarginSoftmax(Objective):
    """Softmax cross-entropy over the training identities with a margin on the target logit."""

    method: str = "margin_softmax"
    model_contract = FeatureModel

    def __init__(self, cfg: MarginConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        if data.num_classes < 2:
            raise ConfigError(f"objective {self.method!r} needs at least 2 training identities, the dataset has "
                              f"{data.num_classes}")
        if not cfg.scale > 0:
            raise ConfigError(f"objective.scale: must be positive, got {cfg.scale}")
        num_features = num_features_of(model, self.method)
        self.scale = float(cfg.scale)
        self.head = EmbeddingHead(num_features, cfg.embedding_dim, rngs=rngs)
        limit = (6.0 / (cfg.embedding_dim + data.num_classes)) ** 0.5  # Xavier uniform, as insightface
        self.centers = nnx.Param(jax.random.uniform(rngs.params(), (cfg.embedding_dim, data.num_classes),
                                                    minval=-limit, maxval=limit))

    @abstractmethod
    def target(self, cos: jax.Array) -> jax.Array:
        """The target class's cosine with the margin applied (elementwise)."""

    def embed(self, model: nnx.Module, images: jax.Array) -> jax.Array:
        """The embeddings ``(batch, embedding_dim)`` of ``images`` (not normalized)."""
        return self.head(model.features(images)).astype(jnp.float32)

    def loss(self, embeddings: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(mean loss, cosines)`` of ``embeddings`` against the class centres."""
        cos = cosines(embeddings, self.centers[...])
        logits = margin_logits(cos, labels, self.target, self.scale)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), cos

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        if "label" not in batch:
            raise ConfigError(f"objective {self.method!r} trains on examples labelled with their identity; the "
                              f"training split has no 'label' (dataset.train_split)")
        labels = batch["label"]
        loss, cos = self.loss(self.embed(model, batch["image"]), labels)
        target_cos = jnp.take_along_axis(cos, labels[:, None], axis=1)[:, 0]
        return loss, {"accuracy": (cos.argmax(-1) == labels).mean(), "target_cos": target_cos.mean()}

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Closed-set identification (the most similar class centre) when the batch is labelled with classes."""
        if "label" not in batch:
            return {}
        cos = cosines(self.embed(model, batch["image"]), self.centers[...])
        return {"identification/top1": (cos.argmax(-1) == batch["label"]).astype(jnp.float32)}


def clipped(cos: jax.Array) -> jax.Array:
    return jnp.clip(cos, -1.0 + EPS, 1.0 - EPS)
