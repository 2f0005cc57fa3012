"""On-device augmentation: compose registered transforms into a jit-able, per-example pipeline.

A transform (registry ``TRANSFORMS``) is built from its config dataclass into a function
``(example, key) -> example`` on ONE example: ``image`` (H, W, C) float in [0, 1], and when present
``boxes`` (N, 4) normalized ``[ymin, xmin, ymax, xmax]`` with ``box_valid`` (N,), and ``mask``
(H, W) integer labels. Geometric transforms move boxes and masks with the image. A :class:`Pipeline`
applies its transforms in order, vmapped over the batch with an independent key per example and per
transform, and normalizes at the end.

Training examples also carry ``EXAMPLE_INDEX_KEY`` (the example's index in its split) and ``EPOCH_KEY``
(the epoch the stream is in for that example) as int32 scalars, for transforms whose choice depends on the
example and epoch rather than a fresh key (airbench's alternating flip); evaluation examples do not.

Config (``augment`` group): ``ops`` is the training pipeline, a list of ``{name: ..., **fields}``;
``views``, when not empty, is a list of pipelines, one per view, for multi-view objectives (SimCLR,
BYOL): the batch then carries ``views``, a list of augmented image batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prism.framework.errors import ConfigError
from prism.framework.registry import TRANSFORMS

Example = dict[str, jax.Array]
#: Per-example keys of a training batch: the example's index in its split, and its epoch in the stream.
EXAMPLE_INDEX_KEY, EPOCH_KEY = "_index", "_epoch"
#: The batch keys a transform sees per example; every other key passes through the pipeline untouched.
PER_EXAMPLE_KEYS = ("image", "boxes", "box_valid", "mask", EXAMPLE_INDEX_KEY, EPOCH_KEY)
TransformFn = Callable[[Example, jax.Array], Example]


@dataclass
class AugmentConfig:
    """ops: training transforms, in order; views: one transform list per view (multi-view objectives)."""

    ops: list[Any] = field(default_factory=list)
    views: list[Any] = field(default_factory=list)


def build_transform(spec: Any, where: str = "augment.ops") -> TransformFn:
    """One transform from ``{name: ..., **fields}``; unknown names and bad fields name the culprit."""
    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig | ListConfig) else spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise ConfigError(f"{where}: each transform is a mapping with a 'name' key, got {spec!r}")
    fields = dict(spec)
    name = fields.pop("name")
    entry = TRANSFORMS.get(name)
    if entry.config is None:
        if fields:
            raise ConfigError(f"{where}: transform {name!r} takes no fields, got {sorted(fields)}")
        return entry.builder()
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), fields))
    except OmegaConfBaseException as exc:
        known = ", ".join(f.name for f in dataclasses.fields(entry.config))
        raise ConfigError(f"{where}: transform {name!r}: {exc.msg if hasattr(exc, 'msg') else exc} "
                          f"(its fields: {known})") from None
    try:
        return entry.builder(cfg)
    except ValueError as exc:  # a builder checking its values (ranges, sizes): the user's config, not a bug
        raise ConfigError(f"{where}: transform {name!r}: {exc}") from None


class Pipeline:
    """Transforms applied in order to every example of a batch, then per-channel normalization."""

    def __init__(self, transforms: Sequence[TransformFn], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.transforms = list(transforms)
        self.mean = None if mean is None else jnp.asarray(mean, jnp.float32)
        self.std = None if std is None else jnp.asarray(std, jnp.float32)

    @classmethod
    def from_config(cls, specs: Sequence[Any], *, mean=None, std=None, where: str = "augment.ops") -> Pipeline:
        return cls([build_transform(s, f"{where}[{i}]") for i, s in enumerate(specs or [])], mean, std)

    def apply_one(self, example: Example, key: jax.Array) -> Example:
        for i, transform in enumerate(self.transforms):
            example = transform(example, jax.random.fold_in(key, i))
        return example

    def __call__(self, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
        """Augment a batch (``image`` float in [0, 1]); keys the transforms don't know pass through."""
        per_example = {k: v for k, v in batch.items() if k in PER_EXAMPLE_KEYS}
        if self.transforms:
            keys = jax.random.split(key, batch["image"].shape[0])
            per_example = jax.vmap(self.apply_one)(per_example, keys)
        out = {**batch, **per_example}
        if self.mean is not None and self.std is not None:
            out["image"] = (out["image"] - self.mean) / self.std
        return out
