"""Built-in optimizers: thin, validated wrappers around optax's SGD, AdamW, LARS and LAMB.

Each builder follows the optimizer contract of :mod:`prism.framework.api`::

    build(cfg, *, learning_rate, weight_decay_mask) -> optax.GradientTransformation

``learning_rate`` is the schedule the trainer built from ``cfg.lr`` (or a plain float), so the
builders never read ``cfg.lr`` themselves; every config still has an ``lr`` field because that is
the base rate the trainer hands to the schedule plugin. ``weight_decay_mask`` follows optax's mask
semantics: ``None`` decays every parameter; otherwise a pytree of bools (or a callable
``params -> pytree of bools``) that is ``True`` where weight decay applies. The core builds it
(typically excluding biases and normalization scales); LARS also uses it to decide which
parameters get the layer-wise trust ratio, as SimCLR does.

Every config inherits :class:`prism.framework.optim.OptimizerOptions` (``lr_multipliers``, ``freeze_after``,
``lookahead_steps``, ``lookahead_alpha``, ``lookahead_alpha_power``), which the core applies around the rule
built here, so a builder never reads them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from prism.framework.errors import ConfigError
from prism.framework.optim import OptimizerOptions
from prism.framework.registry import OPTIMIZERS

#: What the trainer passes as ``weight_decay_mask``: ``None``, a pytree of bools, or a callable.
Mask = Any


def _check(ok: bool, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` naming ``optimizer.<field>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"optimizer.{field}: {message}")


def _check_common(cfg: Any) -> None:
    _check(cfg.lr >= 0.0, "lr", f"must be non-negative, got {cfg.lr}")
    _check(cfg.weight_decay >= 0.0, "weight_decay", f"must be non-negative, got {cfg.weight_decay}")


def _check_betas(cfg: Any) -> None:
    for name in ("b1", "b2"):
        value = getattr(cfg, name)
        _check(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
    _check(cfg.eps >= 0.0, "eps", f"must be non-negative, got {cfg.eps}")


@dataclasses.dataclass
class SGDConfig(OptimizerOptions):
    """SGD with momentum and coupled (L2) weight decay, as ``torch.optim.SGD``.

    Attributes:
        lr: Base learning rate handed to the schedule.
        momentum: Heavy-ball momentum coefficient; 0 disables momentum (and its state).
        nesterov: Use Nesterov momentum (requires ``momentum > 0``).
        weight_decay: L2 coefficient added to the gradient before momentum (``g + wd * p``).
        lr_multipliers, freeze_after, lookahead_steps, lookahead_alpha, lookahead_alpha_power: applied by the
            core to every optimizer (:class:`prism.framework.optim.OptimizerOptions`).
    """

    lr: float = dataclasses.field(default=0.1, metadata={"gt": 0})
    momentum: float = dataclasses.field(default=0.9, metadata={"ge": 0, "lt": 1})
    nesterov: bool = False
    weight_decay: float = dataclasses.field(default=0.0, metadata={"ge": 0})


@OPTIMIZERS.register("sgd", config=SGDConfig,
                     description="SGD with (Nesterov) momentum and coupled L2 weight decay.")
def build_sgd(
    cfg: SGDConfig, *, learning_rate: float | optax.Schedule, weight_decay_mask: Mask
) -> optax.GradientTransformation:
    """torch-style SGD: ``v = mu*v + g + wd*p``; ``p -= lr*v`` (Nesterov: ``p -= lr*(g + wd*p + mu*v)``)."""
    _check_common(cfg)
    _check(0.0 <= cfg.momentum < 1.0, "momentum", f"must be in [0, 1), got {cfg.momentum}")
    _check(not cfg.nesterov or cfg.momentum > 0.0, "nesterov", "requires momentum > 0")
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate, momentum=cfg.momentum or None, nesterov=cfg.nesterov),
    )


@dataclasses.dataclass
class AdamWConfig(OptimizerOptions):
    """Adam with decoupled weight decay (Loshchilov & Hutter).

    Attributes:
        lr: Base learning rate handed to the schedule.
        b1: Decay rate of the first-moment estimate.
        b2: Decay rate of the second-moment estimate.
        eps: Added to the root of the second moment for numerical stability.
        weight_decay: Decoupled decay coefficient (scaled by the learning rate, not by Adam).
        lr_multipliers, freeze_after, lookahead_steps, lookahead_alpha, lookahead_alpha_power: applied by the
            core to every optimizer (:class:`prism.framework.optim.OptimizerOptions`).
    """

    lr: float = dataclasses.field(default=1e-3, metadata={"gt": 0})
    b1: float = dataclasses.field(default=0.9, metadata={"ge": 0, "lt": 1})
    b2: float = dataclasses.field(default=0.999, metadata={"ge": 0, "lt": 1})
    eps: float = dataclasses.field(default=1e-8, metadata={"gt": 0})
    weight_decay: float = dataclasses.field(default=1e-4, metadata={"ge": 0})


@OPTIMIZERS.register("adamw", config=AdamWConfig,
                     description="Adam with decoupled weight decay (optax.adamw).")
def build_adamw(
    cfg: AdamWConfig, *, learning_rate: float | optax.Schedule, weight_decay_mask: Mask
) -> optax.GradientTransformation:
    """``optax.adamw`` with the core's weight-decay mask."""
    _check_common(cfg)
    _check_betas(cfg)
    return optax.adamw(
        learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )


@dataclasses.dataclass
class LARSConfig(OptimizerOptions):
    """LARS: SGD with momentum and a layer-wise trust ratio, for large-batch training (SimCLR).

    Attributes:
        lr: Base learning rate handed to the schedule.
        momentum: Momentum coefficient (applied after the learning rate, as in optax).
        weight_decay: L2 coefficient added to the gradient before the trust ratio.
        trust_coefficient: Multiplier of the trust ratio ``||p|| / (||g + wd * p|| + eps)``.
        eps: Added to the update norm in the trust-ratio denominator.
        lr_multipliers, freeze_after, lookahead_steps, lookahead_alpha, lookahead_alpha_power: applied by the
            core to every optimizer (:class:`prism.framework.optim.OptimizerOptions`).
    """

    lr: float = dataclasses.field(default=0.1, metadata={"gt": 0})
    momentum: float = dataclasses.field(default=0.9, metadata={"ge": 0, "lt": 1})
    weight_decay: float = dataclasses.field(default=1e-6, metadata={"ge": 0})
    trust_coefficient: float = dataclasses.field(default=0.001, metadata={"gt": 0})
    eps: float = dataclasses.field(default=0.0, metadata={"ge": 0})


@OPTIMIZERS.register("lars", config=LARSConfig, description="Layer-wise adaptive rate scaling (optax.lars).")
def build_lars(
    cfg: LARSConfig, *, learning_rate: float | optax.Schedule, weight_decay_mask: Mask
) -> optax.GradientTransformation:
    """``optax.lars`` where the mask selects both weight decay and trust-ratio adaptation."""
    _check_common(cfg)
    _check(0.0 <= cfg.momentum < 1.0, "momentum", f"must be in [0, 1), got {cfg.momentum}")
    _check(cfg.trust_coefficient > 0.0, "trust_coefficient", f"must be positive, got {cfg.trust_coefficient}")
    _check(cfg.eps >= 0.0, "eps", f"must be non-negative, got {cfg.eps}")
    mask = True if weight_decay_mask is None else weight_decay_mask  # optax.lars spells "all" as True
    return optax.lars(
        learning_rate,
        weight_decay=cfg.weight_decay,
        weight_decay_mask=mask,
        trust_coefficient=cfg.trust_coefficient,
        eps=cfg.eps,
        trust_ratio_mask=mask,
        momentum=cfg.momentum,
    )


@dataclasses.dataclass
class LAMBConfig(OptimizerOptions):
    """LAMB: Adam with decoupled weight decay and a layer-wise trust ratio (large-batch training).

    Attributes:
        lr: Base learning rate handed to the schedule.
        b1: Decay rate of the first-moment estimate.
        b2: Decay rate of the second-moment estimate.
        eps: Added to the root of the second moment for numerical stability.
        weight_decay: Decoupled decay coefficient, added before the trust ratio.
        lr_multipliers, freeze_after, lookahead_steps, lookahead_alpha, lookahead_alpha_power: applied by the
            core to every optimizer (:class:`prism.framework.optim.OptimizerOptions`).
    """

    lr: float = dataclasses.field(default=1e-3, metadata={"gt": 0})
    b1: float = dataclasses.field(default=0.9, metadata={"ge": 0, "lt": 1})
    b2: float = dataclasses.field(default=0.999, metadata={"ge": 0, "lt": 1})
    eps: float = dataclasses.field(default=1e-6, metadata={"gt": 0})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"ge": 0})


@OPTIMIZERS.register("lamb", config=LAMBConfig, description="Layer-wise adaptive Adam (optax.lamb).")
def build_lamb(
    cfg: LAMBConfig, *, learning_rate: float | optax.Schedule, weight_decay_mask: Mask
) -> optax.GradientTransformation:
    """``optax.lamb`` with the core's weight-decay mask."""
    _check_common(cfg)
    _check_betas(cfg)
    return optax.lamb(
        learning_rate,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=weight_decay_mask,
    )
