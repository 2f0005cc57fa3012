"""Parts every self-supervised objective shares (private to ``plugins/objectives``).

- :class:`SSLObjective`: the base class. It takes the two augmented views from ``batch["views"]``,
  runs the backbone (``model.features``) on each, asks the method for its loss (:meth:`ssl_loss`), and
  trains an :class:`OnlineProbe` alongside: a linear classifier on the *detached* features, as
  solo-learn's ``BaseMethod`` does, so representation quality is visible during pre-training
  (``train/probe_accuracy``) and on the evaluation split (``eval/online_probe/top1``).
- :class:`MLP`: projection heads and predictors, (Linear-BN-ReLU) x N then Linear (optionally then BN).
- :class:`MomentumCopy`: an EMA copy of a module's parameters held as :class:`EMATarget` variables, which
  are *not* ``nnx.Param``: the trainer's ``nnx.split(system, nnx.Param, ...)`` keeps them out of the
  gradients and the optimizer and carries them (and checkpoints them) in ``TrainState.rest``.
- :class:`MomentumEncoder`: the momentum copy of backbone + projector (MoCo v3's key encoder, BYOL's
  target, DINO's teacher): target forward, reset to the online network, EMA update.
- :func:`cosine_tau`, :func:`check_tau_schedule`, :func:`l2_normalize`.

A method is one file: a config dataclass extending :class:`SSLConfig`, a subclass of
:class:`SSLObjective` implementing :meth:`SSLObjective.ssl_loss`, and a registered builder.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo, FeatureModel, Objective, missing_members
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm

PROBE_PREFIX = "online_probe/"


@dataclass
class SSLConfig:
    """Fields every self-supervised objective has.

    proj_hidden_dim / proj_output_dim: width of the projector's hidden layer(s) and of its output.
    online_probe: train a linear classifier on the detached backbone features alongside (solo-learn's
        online linear evaluation); reports ``train/probe_accuracy`` and ``eval/online_probe/top1``.
        It shares the run's optimizer and learning rate (solo-learn gives it its own, ``classifier_lr``).
    """

    proj_hidden_dim: int = field(default=2048, metadata={"ge": 1})
    proj_output_dim: int = field(default=128, metadata={"ge": 1})
    online_probe: bool = True


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` along the last axis (torch's ``F.normalize``)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine_tau(step: jax.Array | int, total_steps: int, base: float, final: float = 1.0) -> jax.Array:
    """BYOL's target decay: ``final - (final - base) * (cos(pi * step / total) + 1) / 2`` (step clipped)."""
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / max(total_steps, 1)
    return final - (final - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def check_tau_schedule(method: str, base: float, final: float, total_steps: int) -> None:
    """A ConfigError unless ``0 <= base <= final <= 1`` and the run has steps for the schedule to span."""
    if not 0.0 <= base <= final <= 1.0:
        raise ConfigError(f"objective.tau_base/tau_final: need 0 <= tau_base <= tau_final <= 1, "
                          f"got {base} and {final}")
    if total_steps < 1:
        raise ConfigError(f"objective {method!r}: total_steps must be positive, got {total_steps}")


class MLP(nnx.Module):
    """``hidden_layers`` x (Linear - BatchNorm - ReLU), then Linear: SimCLR/BYOL/VICReg heads.

    last_bn: end with a BatchNorm without scale and bias (MoCo v3's projector; the output Linear then has no
    bias either, the normalization would remove it).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, hidden_layers: int = 1,
                 last_bn: bool = False, rngs: nnx.Rngs):
        linears, norms, dim = [], [], in_dim
        for _ in range(hidden_layers):
            linears.append(nnx.Linear(dim, hidden_dim, use_bias=False, rngs=rngs))  # BN supplies the bias
            norms.append(BatchNorm(hidden_dim, rngs=rngs))
            dim = hidden_dim
        self.linears, self.norms = nnx.List(linears), nnx.List(norms)
        self.out = nnx.Linear(dim, out_dim, use_bias=not last_bn, rngs=rngs)
        self.out_norm = BatchNorm(out_dim, use_scale=False, use_bias=False, rngs=rngs) if last_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = nnx.relu(norm(linear(x)))
        x = self.out(x)
        return x if self.out_norm is None else self.out_norm(x)


class OnlineProbe(nnx.Module):
    """A linear classifier on ``stop_gradient(features)``: it learns, the backbone does not learn from it."""

    def __init__(self, num_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(num_features, num_classes, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        return self.linear(jax.lax.stop_gradient(features)).astype(jnp.float32)


class EMATarget(nnx.Variable):
    """A weight of a momentum (EMA) target network. Not an ``nnx.Param``: no gradient, no optimizer
    update, no weight decay; the trainer carries it in ``TrainState.rest``."""


class EMAStep(nnx.Variable):
    """How many EMA updates a momentum objective has made (drives its tau schedule; checkpointed)."""


class MomentumCopy(nnx.Module):
    """An exponential moving average of the ``nnx.Param`` leaves of a module, in the module's own order.

    The copy stores only the weights; :meth:`module` rebuilds the network by merging them into the online
    module's graph (BatchNorm statistics and other state are copied from the online module, so the
    original is never changed by a target forward pass).
    """

    def __init__(self, online: nnx.Module):
        self.weights = nnx.List([EMATarget(jnp.array(x)) for x in jax.tree.leaves(nnx.state(online, nnx.Param))])

    def _online_leaves(self, online: nnx.Module):
        graphdef, params, rest = nnx.split(online, nnx.Param, ...)
        leaves, treedef = jax.tree.flatten(params)
        if len(leaves) != len(self.weights):
            raise ValueError(f"the online module has {len(leaves)} parameters, its EMA copy {len(self.weights)}")
        return graphdef, leaves, treedef, rest

    def module(self, online: nnx.Module) -> nnx.Module:
        """A copy of ``online`` computing with the target weights (no gradient flows into them)."""
        graphdef, _, treedef, rest = self._online_leaves(online)
        target = jax.tree.unflatten(treedef, [jax.lax.stop_gradient(w[...]) for w in self.weights])
        return nnx.merge(graphdef, target, rest, copy=True)

    def reset(self, online: nnx.Module) -> None:
        """``target = online`` for every weight (in place), as copies: a target sharing the online weight's
        buffer would be donated twice by the trainer's step (a crash, or silently corrupted weights)."""
        _, leaves, _, _ = self._online_leaves(online)
        for weight, value in zip(self.weights, leaves, strict=True):
            weight[...] = jnp.array(value, weight[...].dtype, copy=True)

    def update(self, online: nnx.Module, tau: jax.Array) -> None:
        """``target = tau * target + (1 - tau) * online`` for every weight (in place)."""
        _, leaves, _, _ = self._online_leaves(online)
        for weight, value in zip(self.weights, leaves, strict=True):
            value = jax.lax.stop_gradient(value).astype(weight[...].dtype)
            weight[...] = tau * weight[...] + (1.0 - tau) * value


class MomentumEncoder(nnx.Module):
    """The momentum (EMA) copy of an online backbone and its projector, one :class:`MomentumCopy` each.

    ``encode`` runs the copy on views (no gradient reaches it or the online weights through it); ``reset``
    makes it equal to the online network (an objective's ``copy_model_weights``, called by the core after
    ``model.pretrained``); ``update`` moves it ``tau`` of the way it is towards the online weights. The
    objective decides ``tau``, e.g. :func:`cosine_tau` of the run's step (``takes_step``).
    """

    def __init__(self, backbone: nnx.Module, projector: nnx.Module):
        self.backbone = MomentumCopy(backbone)
        self.projector = MomentumCopy(projector)

    def encode(self, backbone: nnx.Module, projector: nnx.Module, views: list[jax.Array]) -> list[jax.Array]:
        """``projector(backbone.features(view))`` with the momentum weights, for each view (detached)."""
        target_backbone, target_projector = self.backbone.module(backbone), self.projector.module(projector)
        return [jax.lax.stop_gradient(target_projector(target_backbone.features(v))) for v in views]

    def reset(self, backbone: nnx.Module, projector: nnx.Module) -> None:
        """``momentum = online`` for every weight."""
        self.backbone.reset(backbone)
        self.projector.reset(projector)

    def update(self, backbone: nnx.Module, projector: nnx.Module, tau: jax.Array) -> None:
        """``momentum = tau * momentum + (1 - tau) * online`` for every weight."""
        self.backbone.update(backbone, tau)
        self.projector.update(projector, tau)


def num_features_of(model: nnx.Module, method: str) -> int:
    """The backbone width, or a ConfigError saying what a self-supervised objective needs from a model."""
    missing = missing_members(model, FeatureModel)
    if missing:
        raise ConfigError(f"objective {method!r} needs a model with {', '.join(missing)} (FeatureModel: the pooled "
                          f"backbone output); {type(model).__name__} has not")
    return model.num_features


class SSLObjective(Objective):
    """Two views -> backbone features -> the method's loss (+ the online probe's cross-entropy).

    Subclasses set :attr:`method` (its registered name) and :attr:`augment_preset` (the augment preset its
    error message recommends) and implement :meth:`ssl_loss`.
    """

    method: str = "ssl"
    augment_preset: str = "simclr"
    model_contract = FeatureModel

    def __init__(self, cfg: SSLConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> None:
        self.num_features = num_features_of(model, self.method)
        self.probe = OnlineProbe(self.num_features, data.num_classes, rngs=rngs) if cfg.online_probe else None

    def views(self, batch: Batch) -> list[jax.Array]:
        """The two augmented views of the batch, or a ConfigError naming the augment preset to use."""
        views = batch.get("views")
        if not views or len(views) != 2:
            found = "no views" if not views else f"{len(views)} views"
            raise ConfigError(f"objective {self.method!r} needs two augmented views per image, got {found}: "
                              f"add augment={self.augment_preset} (or set augment.views to two pipelines)")
        return list(views)

    @abstractmethod
    def ssl_loss(self, model: nnx.Module, views: list[jax.Array], features: list[jax.Array],
                 key: jax.Array) -> tuple[jax.Array, dict]:
        """The method's loss and metrics from the views and their backbone ``features`` (online, train mode)."""

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        views = self.views(batch)
        features = [model.features(v) for v in views]
        loss, metrics = self.ssl_loss(model, views, features, key)
        metrics = {"ssl_loss": loss, **metrics}
        if self.probe is not None:
            if "label" not in batch:
                raise ConfigError(f"objective {self.method!r}: the online probe needs labels in the batch; "
                                  f"set objective.online_probe=false for unlabelled data")
            losses, correct = [], []
            for f in features:  # solo-learn trains its online classifier on every (large) view
                logits = self.probe(f)
                losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())
                correct.append((logits.argmax(-1) == batch["label"]).mean())
            probe_loss = sum(losses) / len(losses)
            metrics.update(probe_loss=probe_loss, probe_accuracy=sum(correct) / len(correct))
            loss = loss + probe_loss
        return loss, metrics

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        """The probe on the un-augmented evaluation images: per-example top-1 correctness and loss."""
        if self.probe is None:
            return {}
        logits = self.probe(model.features(batch["image"]))
        return {f"{PROBE_PREFIX}top1": (logits.argmax(-1) == batch["label"]).astype(jnp.float32),
                f"{PROBE_PREFIX}loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])}


def check_positive(value: float, field: str) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"objective.{field}: must be positive, got {value}")
