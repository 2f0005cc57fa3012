"""Self-supervised pre-training (``task=ssl``): evaluate the representation, not a classifier head.

During pre-training the model's own head is untrained, so its accuracy means nothing. This task reports
``feature_std``: the mean over dimensions of the per-dimension standard deviation of the L2-normalized
backbone features (``model.features``) across the evaluation split. It is about ``1/sqrt(d)`` for features
spread over the sphere and 0 for collapsed ones (SimSiam, Chen & He 2021, section 4.1). The accuracy of
the representation comes from the objective's online probe (``eval/online_probe/top1``, see
``plugins/objectives/_ssl_common.py``). Offline linear / kNN evaluation are separate tasks.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import Batch, DataInfo, FeatureModel, Task
from prism.framework.registry import TASKS


class SelfSupervised(Task):
    batch_keys = ("image", "label")  # labels feed the objective's online probe
    model_contract = FeatureModel

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        features = model.features(batch["image"]).astype(jnp.float32)
        norm = jnp.sqrt(jnp.maximum(jnp.sum(features * features, axis=-1, keepdims=True), 1e-24))
        return {"features": features / norm}

    def summarize(self, outputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        features = np.asarray(outputs["features"], np.float64)
        return {"feature_std": float(features.std(axis=0).mean())}


@TASKS.register("ssl", description="Self-supervised pre-training: feature spread (collapse check) + the "
                                   "objective's online probe.")
def build_ssl(*, data: DataInfo) -> SelfSupervised:
    return SelfSupervised()
