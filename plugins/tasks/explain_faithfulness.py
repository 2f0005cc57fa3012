"""Faithfulness of saliency maps: deletion and insertion AUC (Petsiuk et al. 2018, RISE), against random maps.

For each evaluation image, the explainer ``method`` maps the logit of the predicted class; the map, resized
(bilinearly) to the image, orders the pixels, most important first. **Deletion** replaces the first ``k / steps``
of them by ``0`` of the normalized input (the mean colour when the run normalizes, as RISE's code does) for
``k = 0..steps`` and records the softmax probability of the class; **insertion** starts from the image blurred
(a Gaussian of ``blur_sigma`` pixels) and puts the original pixels back in the same order. Each AUC is the
trapezoidal area under its curve over the fraction of pixels in [0, 1]: a faithful map gives a low deletion and a
high insertion AUC. The baseline is the same procedure with a random map of the method's shape (uniform noise on
the method's own grid, resized the same way), reported as ``random_deletion_auc`` / ``random_insertion_auc``,
with ``deletion_beats_random`` / ``insertion_beats_random``: the share of images where the method's AUC is the
better one. Ties in a map are broken by a tiny random jitter, so no pixel order is favoured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import Batch, DataInfo, InputSpace, Task
from prism.framework.explain import build_explainer
from prism.framework.registry import TASKS
from prism.plugins.explainers._common import gaussian_blur


@dataclass
class ExplainFaithfulnessConfig:
    """method: the explainer (``prism list explainer``).
    method_settings: its settings, ``{steps: 32}`` (typed and checked against its config).
    layer: the tapped layer for methods that explain one ('': the model's default).
    steps: points of each curve after the first (pixels deleted or inserted per point: 1 / steps of the image).
    blur_sigma: standard deviation in pixels of the blur insertion starts from.
    seed: seed of the random maps (and of sampling methods).
    """

    method: str = "gradcam"
    method_settings: dict[str, Any] = field(default_factory=dict)
    layer: str = ""
    steps: int = field(default=16, metadata={"ge": 1})
    blur_sigma: float = field(default=5.0, metadata={"gt": 0})
    seed: int = field(default=0, metadata={"ge": 0})


def resize_maps(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(batch, h, w) maps resized bilinearly to (batch, *size)."""
    if maps.shape[1:] == tuple(size):
        return maps
    return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear")


def pixel_ranks(maps: jax.Array) -> jax.Array:
    """(batch, H, W) int: each pixel's position in its map's descending order (0 = most important)."""
    b = maps.shape[0]
    order = jnp.argsort(-maps.reshape(b, -1), axis=1)
    ranks = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(jnp.arange(order.shape[1])[None, :])
    return ranks.reshape(maps.shape)


def curve(probability: Callable[[jax.Array], jax.Array], start: jax.Array, finish: jax.Array, ranks: jax.Array,
          steps: int) -> jax.Array:
    """(batch, steps + 1): ``probability`` of images that take ``finish``'s pixels of rank below ``k / steps`` of
    the pixels and ``start``'s elsewhere, for ``k = 0..steps`` (deletion: start = image, finish = substrate)."""
    pixels = ranks.shape[1] * ranks.shape[2]

    def point(k):
        chosen = (ranks < jnp.round(k * pixels / steps))[..., None]
        return probability(jnp.where(chosen, finish, start))

    return jax.lax.map(point, jnp.arange(steps + 1)).T


def auc(values: jax.Array) -> jax.Array:
    """Trapezoidal area under curves sampled at equal steps over [0, 1] (last axis)."""
    n = values.shape[-1] - 1
    return (values[..., 1:] + values[..., :-1]).sum(axis=-1) / (2 * n)


def faithfulness_aucs(probability: Callable[[jax.Array], jax.Array], images: jax.Array, maps: jax.Array, *,
                      steps: int, blur_sigma: float) -> tuple[jax.Array, jax.Array]:
    """``(deletion AUC, insertion AUC)`` per example of ``maps`` (batch, H, W) at the images' resolution, each
    pixel's order its map value, descending (equal values: the earlier pixel first)."""
    ranks = pixel_ranks(maps)
    deletion = auc(curve(probability, images, jnp.zeros_like(images), ranks, steps))
    insertion = auc(curve(probability, gaussian_blur(images, blur_sigma), images, ranks, steps))
    return deletion, insertion


class ExplainFaithfulness(Task):
    batch_keys = ("image",)

    def __init__(self, cfg: ExplainFaithfulnessConfig, info: DataInfo) -> None:
        self.explainer, self.method_cfg = build_explainer(cfg.method, cfg.method_settings, where="task.method_settings")
        self.cfg = cfg
        self.model_contract = self.explainer.model_contract
        self.space = InputSpace.of(info)

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        from prism.framework.taps import choose_layer

        x = batch["image"].astype(jnp.float32)
        b, h, w = x.shape[:3]
        rows = jnp.arange(b)
        logits = model(x).astype(jnp.float32)
        target = jnp.argmax(logits, axis=-1)
        key = jax.random.key(self.cfg.seed)
        layer = choose_layer(model, self.cfg.layer, key="task.layer") if self.explainer.uses_layer else None
        maps = self.explainer.explain(model, lambda z: model(z).astype(jnp.float32)[rows, target], x, layer=layer,
                                      key=jax.random.fold_in(key, 1), space=self.space).astype(jnp.float32)
        random = jax.random.uniform(jax.random.fold_in(key, 2), maps.shape)

        def probability(images):
            return jax.nn.softmax(model(images).astype(jnp.float32), axis=-1)[rows, target]

        outputs = {}
        for prefix, m in (("", maps), ("random_", random)):
            m = resize_maps(m, (h, w))
            scale = jnp.abs(m).max(axis=(1, 2), keepdims=True) + 1e-12
            m = m + 1e-6 * scale * jax.random.uniform(jax.random.fold_in(key, 3), m.shape)  # break ties at random
            deletion, insertion = faithfulness_aucs(probability, x, m, steps=self.cfg.steps,
                                                    blur_sigma=self.cfg.blur_sigma)
            outputs[f"{prefix}deletion_auc"], outputs[f"{prefix}insertion_auc"] = deletion, insertion
        return outputs

    def summarize(self, outputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        metrics = {name: float(np.mean(values)) for name, values in outputs.items()}
        metrics["deletion_beats_random"] = float(np.mean(outputs["deletion_auc"] < outputs["random_deletion_auc"]))
        metrics["insertion_beats_random"] = float(np.mean(outputs["insertion_auc"] > outputs["random_insertion_auc"]))
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"method": self.cfg.method, "method_settings": self.explainer.describe(),
                "layer": self.cfg.layer or None, "steps": self.cfg.steps, "blur_sigma": self.cfg.blur_sigma,
                "seed": self.cfg.seed}


@TASKS.register("explain_faithfulness", config=ExplainFaithfulnessConfig,
                description="Deletion / insertion AUC of an explainer's maps against random maps (Petsiuk 2018).")
def build_explain_faithfulness(cfg: ExplainFaithfulnessConfig, *, data: DataInfo) -> ExplainFaithfulness:
    return ExplainFaithfulness(cfg, data)
