"""The contracts between the core and its plugins.

Each plugin kind is a builder registered in :mod:`prism.framework.registry`; these are the objects the
builders return and the arguments they receive. Everything here is generic: a batch is a dict of
arrays whose keys the task defines (``image`` and ``label`` for classification, ``boxes`` for
detection, ``mask`` for segmentation, ...).

- dataset builder ``(cfg) -> DataSource``
- model builder ``(cfg, *, data: DataInfo, rngs: nnx.Rngs) -> nnx.Module``
- objective builder ``(cfg, *, model, data: DataInfo, rngs: nnx.Rngs[, total_steps: int]) -> Objective``;
  ``total_steps`` (the number of training batches in the run, i.e. of calls to the objective; optimizer
  updates times ``train.grad_accum_steps``) is passed only to builders that declare that keyword, for
  objectives with their own schedules (an EMA target's decay)
- task builder ``(cfg, *, data: DataInfo) -> Task``
- optimizer builder ``(cfg, *, learning_rate, weight_decay_mask) -> optax.GradientTransformation``
- schedule builder ``(cfg, *, base_lr: float, total_steps: int) -> optax.Schedule``
- explainer builder ``(cfg) -> Explainer``
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
from flax import nnx

from prism.framework.errors import ConfigError

Batch = dict[str, Any]


@dataclass(frozen=True)
class DataInfo:
    """What a dataset tells models and tasks about itself."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (height, width, channels) of the decoded examples
    splits: Mapping[str, int] = field(default_factory=dict)  # split name -> number of examples
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None  # per-channel mean of images in [0, 1], for normalization
    std: tuple[float, ...] | None = None


@runtime_checkable
class DataSource(Protocol):
    """A dataset: metadata plus a random-access sequence of example dicts per split.

    Any ``Sequence`` of dicts of NumPy arrays works as a split, TFDS array_record data sources
    (``tfds.data_source``) included; grain reads it by index, which makes the pipeline resumable.
    """

    info: DataInfo

    def split(self, name: str) -> Sequence[Mapping[str, np.ndarray]]: ...


@runtime_checkable
class StackableSplit(Protocol):
    """A split that hands over all its examples as one array per key faster than reading them one by one (a
    decoded copy it keeps on disk, say). The device path (``loader.placement=device``) uses it when a split
    offers it; ``threads`` is how many reader threads it may use when it must read the examples after all."""

    def stacked(self, *, threads: int) -> dict[str, np.ndarray]: ...


@runtime_checkable
class CopiesModelWeights(Protocol):
    """An objective that keeps its own copy of the model's weights (a momentum target) which must start equal
    to them. The core calls ``copy_model_weights(model)`` whenever it replaces the model's initial weights
    after the objective was built (``model.pretrained``, a :class:`DataInitialized` model's data fit)."""

    def copy_model_weights(self, model: nnx.Module) -> None: ...


@runtime_checkable
class DataInitialized(Protocol):
    """A model that sets some of its weights from training data after initialization (a first layer whitened
    from image patches, say). The core calls ``fit_to_data`` once, before training starts from scratch (not on
    resume, not under ``model.pretrained``), with the first training images as uint8 ``(N, H, W, C)``."""

    def fit_to_data(self, images: np.ndarray) -> None: ...


class FeatureModel(Protocol):
    """A model whose pooled backbone output can be read: what self-supervised objectives, kNN and the linear
    probe need. ``features(x)`` gives ``(batch, num_features)``."""

    num_features: int

    def features(self, x: jax.Array) -> jax.Array: ...


class Detector(Protocol):
    """A detection model: ``detect(images) -> (boxes, scores)`` (normalized corner boxes, per-class scores)."""

    def detect(self, images: jax.Array) -> tuple[jax.Array, jax.Array]: ...


class TappedModel(Protocol):
    """A model that marks intermediate feature maps with :func:`prism.framework.taps.tap`: what explainers that
    read or differentiate a layer need (Grad-CAM). ``tap_layers`` names them in forward order; each is a map
    (batch, h, w, channels) on the image's grid (a transformer's patch tokens as a grid); the last is the layer
    explained by default (a CNN's last convolutional stage)."""

    tap_layers: tuple[str, ...]


class AttentionModel(Protocol):
    """A transformer that taps its attention weights (:func:`prism.framework.taps.tap`): what attention rollout
    needs. ``attention_layers`` names them in forward order; each is (batch, heads, tokens, tokens), softmax over
    the last axis, the first ``tokens - h * w`` tokens extra (a class token) and the rest the patch grid, row by
    row, with the image's aspect ratio."""

    attention_layers: tuple[str, ...]


def contract_members(contract: type) -> list[str]:
    """The attributes and methods a Protocol declares (annotated attributes first), in declaration order."""
    methods = [n for n, v in vars(contract).items() if callable(v) and not n.startswith("_")]
    return [*getattr(contract, "__annotations__", {}), *methods]


def missing_members(model: Any, contract: type) -> list[str]:
    """The members of ``contract`` that ``model`` lacks (methods must be callable, ``int`` attributes ints)."""
    missing = []
    annotations = getattr(contract, "__annotations__", {})
    for name in contract_members(contract):
        value = getattr(model, name, None)
        if name in annotations:
            ok = value is not None and (annotations[name] not in (int, "int") or isinstance(value, int))
        else:
            ok = callable(value)
        if not ok:
            missing.append(f"{name}()" if name not in annotations else name)
    return missing


class Objective(nnx.Module):
    """The training signal. Subclasses may own trainable parts (projection heads, predictors).

    ``__call__(model, batch, key)`` returns ``(loss, metrics)``: a scalar loss averaged over the
    global batch and a dict of scalar metrics. ``key`` is a per-step PRNG key. State the objective
    changes (BatchNorm statistics, EMA targets) is updated in place as NNX variables; the trainer
    carries it between steps. Variables that are not ``nnx.Param`` get no gradient and no optimizer
    update (an EMA target is a custom ``nnx.Variable`` subclass).

    ``eval_outputs(model, batch)`` lets an objective add to evaluation what only it can measure (an
    online probe it trains, say): per-example arrays like the task's, averaged over the evaluation split
    and reported as ``eval/<name>`` beside the task's metrics (a name both report is an error).

    ``model_contract``: the Protocol (e.g. :class:`FeatureModel`) the model must satisfy; checked when the run
    is built, with a one-line error naming the model and what it lacks. ``takes_step``: when True the step
    calls ``objective(model, batch, key, step=...)`` with the training step about to be taken (0-based, a
    traced int32), for schedules driven by the run's step rather than a counter of the objective's own.
    """

    model_contract: type | None = None
    takes_step: bool = False

    @abstractmethod
    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        """Loss and scalar metrics of ``model`` on a global ``batch``."""

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Per-example evaluation outputs of the objective on a global ``batch`` (runs under jit); none here."""
        return {}


class Task(ABC):
    """Data contract and evaluation of a problem (classification, detection, segmentation, ...).

    ``eval_outputs`` runs inside ``jit`` on a global batch and returns a dict of arrays whose leading
    axis is the batch; ``summarize`` receives those outputs for the whole evaluation split (padding
    already removed) on the host and returns the reported metrics. The default summary is the mean of
    each per-example output, which is exact over a split of any size.

    Optional parts:

    - ``reference_split``: a split whose ``eval_outputs`` evaluation also computes and passes to
      ``summarize(outputs, reference=...)``; for evaluations that fit something on the training data first
      (a kNN bank, a linear probe on frozen features). ``"train"`` means the run's training split
      (``dataset.train_split``, e.g. ``train[:90%]`` when the rest is held out for evaluation).
    - ``eval_outputs_key()``: tasks whose ``eval_outputs`` are the same arrays for the same model and batch
      return the same hashable key; an evaluation of several tasks in one process (``prism eval
      eval.tasks=[...]``) then computes those outputs once per split and hands them to each task's
      ``summarize`` (the backbone features that kNN and the linear probe both use, say). ``None``: not shared.
    - ``describe()``: settings that say what the numbers are (``{"k": 200}``), written into result files.
    - ``render(batch, outputs, directory)``: pictures of predictions (boxes drawn, masks overlaid) for the
      first evaluation examples, written at the end of a run and by ``prism eval``.
    - ``predict_outputs(model, batch)`` and ``prediction_record(outputs, image_size)``: predictions for
      unlabelled images (``prism predict``): per-example arrays under jit from a batch holding only
      ``image``, then one JSON-able record per image; ``render`` draws them.
    """

    #: Keys a batch must hold for this task (checked against the dataset's examples when the run is built).
    batch_keys: tuple[str, ...] = ("image",)
    #: The Protocol the model must satisfy for this task (e.g. :class:`FeatureModel`); checked at build time.
    model_contract: type | None = None
    #: Split whose outputs ``summarize`` also receives as ``reference`` (None: none).
    reference_split: str | None = None
    #: When True, ``eval_outputs`` is called as ``eval_outputs(model, batch, objective=...)`` with the run's
    #: objective too, for tasks that evaluate what a trainable part of the objective computes (an embedding head).
    takes_objective: bool = False
    #: Other batch keys holding uint8 images that evaluation converts and normalizes exactly as it does ``image``
    #: (the second image of a verification pair).
    extra_image_keys: tuple[str, ...] = ()

    @abstractmethod
    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Per-example evaluation outputs of ``model`` on a global ``batch`` (runs under jit)."""

    def summarize(self, outputs: Mapping[str, np.ndarray],
                  reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        """Metrics from the outputs over the evaluation split (``reference``: over ``reference_split``)."""
        return {name: float(np.mean(values)) for name, values in outputs.items()}

    def eval_outputs_key(self) -> Hashable | None:
        """A key equal for tasks whose ``eval_outputs`` give the same arrays for the same model and batch (they
        may then share one computation of them); ``None`` (default): this task's outputs are its own."""
        return None

    def describe(self) -> dict[str, Any]:
        """JSON-able settings that qualify the reported metrics (none by default)."""
        return {}

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
               directory: Path) -> list[Path]:
        """Write pictures of the predictions ``outputs`` for the raw examples ``batch`` (uint8 ``image``
        plus the dataset's keys) into ``directory`` (creating it); returns the files written (none by
        default)."""
        return []

    def predict_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """Per-example predictions of ``model`` for a global batch holding only ``image`` (runs under jit)."""
        raise ConfigError(f"task {type(self).__name__} does not predict on unlabelled images (it defines no "
                          f"predict_outputs)")

    def prediction_record(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> dict[str, Any]:
        """One image's ``predict_outputs`` as JSON-able data; ``image_size`` is the input file's (height, width).
        Default: the arrays as lists."""
        return {name: np.asarray(value).tolist() for name, value in outputs.items()}


@dataclass(frozen=True)
class InputSpace:
    """Where images live once normalized for the model: the per-channel values of a black and of a white pixel
    (explainers build baselines and noise scales from them)."""

    black: tuple[float, ...]
    white: tuple[float, ...]

    @classmethod
    def of(cls, info: DataInfo) -> InputSpace:
        """The space of images normalized with ``info``'s mean/std (none: [0, 1])."""
        channels = info.image_shape[-1]
        mean = info.mean if info.mean is not None else (0.0,) * channels
        std = info.std if info.std is not None else (1.0,) * channels
        return cls(tuple(-m / s for m, s in zip(mean, std, strict=True)),
                   tuple((1 - m) / s for m, s in zip(mean, std, strict=True)))


class Explainer(ABC):
    """A saliency method: a map of how much each place of an image matters to a score of the model.

    ``explain(model, score, images, layer=..., key=..., space=...)`` runs under jit on normalized ``images``
    (batch, H, W, C). ``score(images)`` gives the scalar to explain, one per example (the logit of the class to
    explain), differentiable in the images and in every tapped activation; ``model`` is the module it runs (its
    declared taps). It returns maps (batch, h, w): at the image's resolution or coarser (a layer's grid), larger
    meaning more important. ``layer`` is a name of ``model.tap_layers`` for explainers with ``uses_layer``
    (None elsewhere); ``key`` a PRNG key for sampling methods; ``space`` the normalized values of black and white.

    ``model_contract``: the Protocol (:class:`TappedModel`, :class:`AttentionModel`) the model must satisfy,
    checked before anything is traced, with a one-line error naming what the model lacks.
    """

    model_contract: type | None = None
    uses_layer: bool = False

    @abstractmethod
    def explain(self, model: nnx.Module, score: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                layer: str | None, key: jax.Array, space: InputSpace) -> jax.Array:
        """Maps (batch, h, w) of what ``score`` depends on in ``images``."""

    def describe(self) -> dict[str, Any]:
        """JSON-able settings of the method (written beside its maps); none by default."""
        return {}
