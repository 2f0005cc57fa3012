"""What the offline evaluation tasks share (private to ``plugins/tasks``): frozen backbone features.

:class:`FrozenFeatureTask` is a task whose evaluation outputs are the backbone features
``model.features(x)`` and the labels of the evaluation split, computed in the trainer's jitted evaluation
step (eval mode: BatchNorm running statistics, no dropout). It sets ``reference_split = "train"``, so
evaluation computes the same outputs over the training split and hands them to ``summarize`` as
``reference``: the kNN classifier looks its neighbours up there, the linear probe trains on them. The
backbone is never updated by these tasks; the evaluation metric is a property of the frozen features.

The outputs depend on nothing but the model and the batch (each task transforms the features in its
``summarize``: kNN normalizes them, the probe standardizes them), so every such task returns the same
:meth:`~FrozenFeatureTask.eval_outputs_key`: evaluating kNN and the probe in one process
(``prism eval eval.tasks=[linear_probe,knn]``) runs the backbone over each split once.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import Batch, FeatureModel, Task
from prism.framework.errors import ConfigError


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of ``x`` scaled to unit length (a zero row stays zero)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class FrozenFeatureTask(Task):
    """Outputs the raw ``features`` and ``label`` per example; needs ``reference``."""

    name: str = "frozen_features"
    batch_keys = ("image", "label")
    model_contract = FeatureModel
    reference_split: str | None = "train"

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        features = model.features(batch["image"]).astype(jnp.float32)
        if features.ndim != 2:
            raise ConfigError(f"task {self.name!r}: model.features(x) must return (batch, num_features), got "
                              f"shape {features.shape}")
        return {"features": jax.lax.stop_gradient(features), "label": batch["label"].astype(jnp.int32)}

    def eval_outputs_key(self) -> object:
        """The ``eval_outputs`` function itself: tasks that do not override it share its outputs."""
        return type(self).eval_outputs

    def split_outputs(self, outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(reference features, reference labels, eval features, eval labels)`` or a ConfigError."""
        if reference is None:
            raise ConfigError(f"task {self.name!r} needs the features of its reference split "
                              f"({self.reference_split!r}) to summarize; the evaluation loop gave none")
        for part, what in ((outputs, "evaluation"), (reference, "reference")):
            if len(part.get("features", ())) == 0:
                raise ConfigError(f"task {self.name!r}: the {what} split gave no examples")
        return (np.asarray(reference["features"], np.float32), np.asarray(reference["label"], np.int64),
                np.asarray(outputs["features"], np.float32), np.asarray(outputs["label"], np.int64))
