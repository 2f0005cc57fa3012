"""Built-in learning-rate schedules, built from optax's schedule functions.

Each builder follows the schedule contract of :mod:`prism.framework.api`::

    build(cfg, *, base_lr, total_steps) -> optax.Schedule

Lengths are given relative to the run (fractions of ``total_steps``) where that is the natural
unit, so a config keeps its meaning when the number of epochs or the batch size changes. Bad values
raise :class:`ConfigError` naming the field (``schedule.<field>: ...``) before optax sees them.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

from prism.framework.errors import ConfigError
from prism.framework.registry import SCHEDULES


def _check(ok: bool, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` naming ``schedule.<field>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"schedule.{field}: {message}")


def _check_run(base_lr: float, total_steps: int) -> None:
    if base_lr < 0:
        raise ConfigError(f"optimizer.lr: the base learning rate must be non-negative, got {base_lr}")
    if total_steps < 1:
        raise ConfigError(f"schedule total_steps must be positive, got {total_steps} (is the run empty?)")


def _to_steps(fraction: float, total_steps: int) -> int:
    """``fraction * total_steps`` rounded half up to a whole step."""
    return int(math.floor(fraction * total_steps + 0.5))


def _check_fraction(value: float, field: str) -> None:
    _check(0.0 <= value <= 1.0, field, f"must be a fraction in [0, 1], got {value}")


@dataclasses.dataclass
class ConstantConfig:
    """A constant learning rate, optionally after a linear warmup from 0.

    Attributes:
        warmup_steps: Number of steps of linear warmup from 0 to the base rate (0: none).
    """

    warmup_steps: int = dataclasses.field(default=0, metadata={"ge": 0})


@SCHEDULES.register("constant", config=ConstantConfig, description="Constant rate, optional linear warmup.")
def build_constant(cfg: ConstantConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """``base_lr`` throughout, reached linearly over ``warmup_steps`` when that is positive."""
    _check_run(base_lr, total_steps)
    _check(0 <= cfg.warmup_steps <= total_steps, "warmup_steps",
           f"must be in [0, total_steps={total_steps}], got {cfg.warmup_steps}")
    if cfg.warmup_steps == 0:
        return optax.constant_schedule(base_lr)
    return optax.warmup_constant_schedule(0.0, base_lr, cfg.warmup_steps)


@dataclasses.dataclass
class StepConfig:
    """Multiply the rate by ``gamma`` at each milestone (torch's MultiStepLR).

    Attributes:
        milestones: Increasing fractions of ``total_steps`` in (0, 1) at which the rate drops; the
            drop takes effect at step ``fraction * total_steps`` rounded half up.
        gamma: Factor applied at each milestone (positive; usually < 1).
    """

    milestones: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.75], metadata={"gt": 0, "lt": 1})
    gamma: float = dataclasses.field(default=0.1, metadata={"gt": 0})


@SCHEDULES.register("step", config=StepConfig, description="Drop the rate by gamma at fractions of the run.")
def build_step(cfg: StepConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """``base_lr * gamma ** (number of milestones reached)`` via optax.piecewise_constant_schedule."""
    _check_run(base_lr, total_steps)
    _check(cfg.gamma > 0, "gamma", f"must be positive, got {cfg.gamma}")
    milestones = [float(m) for m in cfg.milestones]
    _check(all(0.0 < m < 1.0 for m in milestones), "milestones",
           f"must be fractions of the run in (0, 1), got {milestones}")
    _check(all(a < b for a, b in zip(milestones, milestones[1:], strict=False)), "milestones",
           f"must be strictly increasing, got {milestones}")
    scales: dict[int, float] = {}
    for m in milestones:  # milestones that round to the same step compound instead of colliding
        step = _to_steps(m, total_steps)
        scales[step] = scales.get(step, 1.0) * cfg.gamma
    return optax.piecewise_constant_schedule(base_lr, scales)


@dataclasses.dataclass
class CosineConfig:
    """Cosine decay from the base rate over the whole run (no warmup).

    Attributes:
        final_lr_fraction: Rate at the end of the run, as a fraction of the base rate.
    """

    final_lr_fraction: float = dataclasses.field(default=0.0, metadata={"ge": 0, "le": 1})


@SCHEDULES.register("cosine", config=CosineConfig, description="Cosine decay over the run.")
def build_cosine(cfg: CosineConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """``base_lr * (a + (1 - a) * (1 + cos(pi * t / T)) / 2)`` with ``a = final_lr_fraction``."""
    _check_run(base_lr, total_steps)
    _check_fraction(cfg.final_lr_fraction, "final_lr_fraction")
    return optax.cosine_decay_schedule(base_lr, total_steps, alpha=cfg.final_lr_fraction)


@dataclasses.dataclass
class WarmupCosineConfig:
    """Linear warmup to the base rate, then cosine decay for the rest of the run.

    Attributes:
        warmup_fraction: Length of the warmup as a fraction of ``total_steps`` (used when
            ``warmup_steps`` is -1); rounded to the nearest step.
        warmup_steps: Length of the warmup in steps; -1 means use ``warmup_fraction``.
        init_lr_fraction: Rate at step 0, as a fraction of the base rate.
        final_lr_fraction: Rate at the end of the run, as a fraction of the base rate.
    """

    warmup_fraction: float = dataclasses.field(default=0.05, metadata={"ge": 0, "lt": 1, "when": ("warmup_steps", -1)})
    warmup_steps: int = dataclasses.field(default=-1, metadata={"ge": -1})
    init_lr_fraction: float = dataclasses.field(default=0.0, metadata={"ge": 0, "le": 1})
    final_lr_fraction: float = dataclasses.field(default=0.0, metadata={"ge": 0, "le": 1})


def _warmup_steps(cfg: WarmupCosineConfig, total_steps: int) -> int:
    """The warmup length in steps that ``cfg`` means for a run of ``total_steps``."""
    if cfg.warmup_steps == -1:
        _check(0.0 <= cfg.warmup_fraction < 1.0, "warmup_fraction",
               f"must be in [0, 1), got {cfg.warmup_fraction}")
        return _to_steps(cfg.warmup_fraction, total_steps)
    _check(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, or -1 to use warmup_fraction; got "
           f"{cfg.warmup_steps}")
    return int(cfg.warmup_steps)


@SCHEDULES.register("warmup_cosine", config=WarmupCosineConfig,
                    description="Linear warmup, then cosine decay over the rest of the run.")
def build_warmup_cosine(cfg: WarmupCosineConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """optax.warmup_cosine_decay_schedule; the cosine spans ``total_steps - warmup`` steps."""
    _check_run(base_lr, total_steps)
    _check_fraction(cfg.init_lr_fraction, "init_lr_fraction")
    _check_fraction(cfg.final_lr_fraction, "final_lr_fraction")
    warmup = _warmup_steps(cfg, total_steps)
    field = "warmup_steps" if cfg.warmup_steps != -1 else "warmup_fraction"
    _check(warmup < total_steps, field,
           f"the warmup ({warmup} steps) must be shorter than the run (total_steps={total_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.init_lr_fraction * base_lr,
        peak_value=base_lr,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=cfg.final_lr_fraction * base_lr,
    )


@dataclasses.dataclass
class TriangleConfig:
    """Piecewise-linear up then down (airbench's ``triangle``, a linear one-cycle).

    Attributes:
        start_fraction: Rate at step 0, as a fraction of the base rate.
        peak_fraction: Where the base rate is reached, as a fraction of ``total_steps`` (floored to a step).
        end_fraction: Rate at the last step, as a fraction of the base rate.
    """

    start_fraction: float = dataclasses.field(default=0.0, metadata={"ge": 0, "le": 1})
    peak_fraction: float = dataclasses.field(default=0.5, metadata={"ge": 0, "le": 1})
    end_fraction: float = dataclasses.field(default=0.0, metadata={"ge": 0, "le": 1})


@SCHEDULES.register("triangle", config=TriangleConfig,
                    description="Linear from start to the base rate at the peak, then linear to end (airbench).")
def build_triangle(cfg: TriangleConfig, *, base_lr: float, total_steps: int) -> optax.Schedule:
    """``base_lr`` times the line through (0, start), (peak, 1), (total_steps, end), constant after the end;
    ``peak = floor(peak_fraction * total_steps)`` as airbench's ``int(peak * steps)``."""
    _check_run(base_lr, total_steps)
    for name in ("start_fraction", "peak_fraction", "end_fraction"):
        _check_fraction(getattr(cfg, name), name)
    start, end, peak = float(cfg.start_fraction), float(cfg.end_fraction), int(cfg.peak_fraction * total_steps)

    def schedule(count):
        t = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, float(total_steps))
        up = start + (1.0 - start) * t / peak if peak > 0 else jnp.ones_like(t)
        down = 1.0 + (end - 1.0) * (t - peak) / (total_steps - peak) if peak < total_steps else jnp.ones_like(t)
        return base_lr * jnp.where(t < peak, up, down)

    return schedule
