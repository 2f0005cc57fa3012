"""Build the optax transformation of a run from the optimizer and schedule registries.

The plugin gives the update rule (sgd, adamw, lars, ...) and the schedule its shape; the core adds
what every optimizer shares: the weight-decay mask, global-norm clipping and gradient accumulation
(``optax.MultiSteps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import optax
from omegaconf import DictConfig, OmegaConf

from prism.framework.errors import ConfigError
from prism.framework.registry import OPTIMIZERS, SCHEDULES


def plugin_config(section: DictConfig) -> Any:
    """The plugin's config dataclass instance from its Hydra section (which carries ``name``)."""
    return OmegaConf.to_object(section) if isinstance(section, DictConfig) else section


def decay_mask(params: Any) -> Any:
    """True for tensors that get weight decay: kernels and embeddings, not biases or norm scales."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


@dataclass(frozen=True)
class OptimizerBundle:
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    updates: int  # optimizer updates in the run (micro-steps / accumulation)


def build_optimizer(cfg: DictConfig, *, updates: int) -> OptimizerBundle:
    """The run's optax transformation; ``updates`` is the number of optimizer updates it will make."""
    opt_cfg = plugin_config(cfg.optimizer)
    if not hasattr(opt_cfg, "lr"):
        raise ConfigError(f"optimizer {cfg.optimizer.name!r}: its config has no 'lr' field")
    train = cfg.train
    if train.grad_accum_steps < 1:
        raise ConfigError(f"train.grad_accum_steps must be >= 1, got {train.grad_accum_steps}")
    schedule = SCHEDULES.build(cfg.schedule.name, plugin_config(cfg.schedule), base_lr=float(opt_cfg.lr),
                               total_steps=updates)
    mask = decay_mask if train.weight_decay_skip_1d else None
    tx = OPTIMIZERS.build(cfg.optimizer.name, opt_cfg, learning_rate=schedule, weight_decay_mask=mask)
    if train.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    if train.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum_steps).gradient_transformation()
    return OptimizerBundle(tx=tx, schedule=schedule, updates=updates)
