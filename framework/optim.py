"""Build the optax transformation of a run from the optimizer and schedule registries.

The plugin gives the update rule (sgd, adamw, lars, ...) and the schedule its shape; the core adds
what every optimizer shares: the weight-decay mask, global-norm clipping and gradient accumulation
(``optax.MultiSteps``), and the :class:`OptimizerOptions` of configs that inherit them (the built-in ones
do): per-parameter learning-rate multipliers, freezing parameters part way through the run, and lookahead.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
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


@dataclass
class OptimizerOptions:
    """Options the core applies around the update rule of any optimizer whose config inherits this class.

    lr_multipliers: ``{PATTERN: FACTOR}``: parameters whose path matches PATTERN train with FACTOR times the
        learning rate, while their weight decay per step stays as it was (the optimizer's ``weight_decay`` is
        divided by FACTOR for them): airbench's ``bias_scaler`` (BatchNorm biases at 64x). A PATTERN is an
        fnmatch pattern matched against the dotted parameter path (``model.blocks.0.norm1.bias``) and each of
        its dotted suffixes, so ``bias`` matches every bias and ``norm*.bias`` the biases of layers named
        norm...; the first matching pattern wins, and one that matches no parameter is an error.
    freeze_after: ``{PATTERN: FRACTION}``: matching parameters (same matching) stop changing after that
        fraction of the run's optimizer updates (0: never trained); airbench trains its whitening-layer bias
        for the first 3 of its 9.9 epochs.
    lookahead_steps: lookahead (Zhang et al. 2019; ``optax.lookahead``): every ``lookahead_steps`` updates the
        slow weights move ``alpha`` of the way to the trained (fast) weights, and training continues from the
        slow weights; the last update of the run ends on them too. 0 disables.
    lookahead_alpha: the slow weights' step size ``alpha`` (optax's ``slow_step_size``).
    lookahead_alpha_power: with p > 0, alpha at update t of T is ``1 - (1 - lookahead_alpha) * (t / T) ** p``:
        1 (no lookahead) at the start, ``lookahead_alpha`` at the end; airbench uses p = 3 with alpha
        ``1 - 0.95 ** 5``. 0 keeps alpha constant.
    """

    lr_multipliers: dict[str, float] = field(default_factory=dict, metadata={"gt": 0})
    freeze_after: dict[str, float] = field(default_factory=dict, metadata={"ge": 0, "le": 1})
    lookahead_steps: int = field(default=0, metadata={"ge": 0})
    lookahead_alpha: float = field(default=0.5, metadata={"gt": 0, "le": 1})
    lookahead_alpha_power: float = field(default=0.0, metadata={"ge": 0})


# -- matching parameters by path ------------------------------------------------------------------------
def dotted_path(path: tuple) -> str:
    """``model.blocks.0.norm1.bias`` for a pytree key path (an ``nnx.State`` leaf's trailing ``.value`` dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        else:
            parts.append(str(getattr(key, "key", key)))
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def path_matches(path: str, pattern: str) -> bool:
    """``pattern`` (fnmatch) matches the dotted ``path`` or one of its dotted suffixes."""
    names = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(names[i:]), pattern) for i in range(len(names)))


def label_params(tree: Any, patterns: list[str], field_name: str, default: str = "") -> Any:
    """The first of ``patterns`` matching each leaf's path (``default`` when none does), as a tree like
    ``tree``; a pattern that matches no leaf is a :class:`ConfigError` naming ``optimizer.<field_name>``."""
    used: set[str] = set()

    def label(path, _leaf) -> str:
        name = dotted_path(path)
        for pattern in patterns:
            if path_matches(name, pattern):
                used.add(pattern)
                return pattern
        return default

    labels = jax.tree_util.tree_map_with_path(label, tree)
    unused = [p for p in patterns if p not in used]
    if unused:
        paths = [dotted_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
        raise ConfigError(f"optimizer.{field_name}: {', '.join(map(repr, unused))} matches no parameter "
                          f"(parameter paths: {shown})")
    return labels


def _patterns(opt_cfg: Any, field_name: str, ok: Callable[[float], bool], allowed: str) -> dict[str, float]:
    values = dict(getattr(opt_cfg, field_name, None) or {})
    for pattern, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"optimizer.{field_name}.{pattern} must be {allowed}, got {value!r}")
    return {str(k): float(v) for k, v in values.items()}


# -- the transformations the options add ----------------------------------------------------------------
def with_lr_multipliers(build: Callable[[Any, Any], optax.GradientTransformation], opt_cfg: Any,
                        schedule: optax.Schedule, multipliers: Mapping[str, float]) -> optax.GradientTransformation:
    """``build(cfg, learning_rate)`` for every parameter, except that parameters matching a pattern of
    ``multipliers`` get ``factor * schedule`` and (when ``opt_cfg`` has one) ``weight_decay / factor``:
    their lr is scaled, their decay per step (lr times weight_decay) is not. One ``optax.multi_transform``
    group per pattern."""
    if not multipliers:
        return build(opt_cfg, schedule)
    patterns = list(multipliers)
    transforms = {"": build(opt_cfg, schedule)}
    for pattern, factor in multipliers.items():
        cfg = opt_cfg
        if dataclasses.is_dataclass(cfg) and "weight_decay" in {f.name for f in dataclasses.fields(cfg)}:
            cfg = dataclasses.replace(cfg, weight_decay=cfg.weight_decay / factor)
        transforms[pattern] = build(cfg, lambda count, f=factor: f * schedule(count))
    return optax.multi_transform(transforms, lambda tree: label_params(tree, patterns, "lr_multipliers"))


class FreezeState(NamedTuple):
    count: jax.Array  # updates made so far


def freeze_after(fractions: Mapping[str, float], total_updates: int) -> optax.GradientTransformation:
    """Zero the updates of parameters matching a pattern of ``fractions`` from update
    ``round(fraction * total_updates)`` on (chain it after the optimizer: weight decay stops too)."""
    patterns = list(fractions)
    stops = {p: int(math.floor(f * total_updates + 0.5)) for p, f in fractions.items()}

    def init(params):
        del params
        return FreezeState(jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        del params
        labels = jax.tree.leaves(label_params(updates, patterns, "freeze_after"))
        leaves, treedef = jax.tree.flatten(updates)
        leaves = [u if lab == "" else jnp.where(state.count < stops[lab], u, jnp.zeros_like(u))
                  for u, lab in zip(leaves, labels, strict=True)]
        return jax.tree.unflatten(treedef, leaves), FreezeState(state.count + 1)

    return optax.GradientTransformation(init, update)


class LookaheadState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    slow: Any  # the slow weights (same tree as the parameters)
    count: jax.Array  # updates made so far


def lookahead(inner: optax.GradientTransformation, sync_period: int, alpha: float, *, total_updates: int,
              alpha_power: float = 0.0) -> optax.GradientTransformation:
    """Lookahead on plain parameters: the slow weights live in this transformation's state, and its updates
    move the parameters to where ``optax.lookahead``'s fast weights would be.

    Update t (from 1): ``fast = params + inner update``; when ``t % sync_period == 0``,
    ``slow += alpha_t * (fast - slow)`` and the parameters become ``slow``, else ``fast``; at
    ``t == total_updates`` they become ``slow`` (the run ends on the slow weights). ``alpha_t`` is ``alpha``, or
    with ``alpha_power`` p > 0, ``1 - (1 - alpha) * (t / total_updates) ** p`` (airbench's schedule).
    ``optax.lookahead`` itself wants ``optax.LookaheadParams`` (fast and slow copies) as the parameters, which the
    trainer, applying updates to one parameter tree, does not have.
    """
    if sync_period < 1:
        raise ValueError(f"lookahead sync period must be >= 1, got {sync_period}")

    def alpha_at(count: jax.Array) -> jax.Array:
        if alpha_power == 0:
            return jnp.asarray(alpha, jnp.float32)
        progress = jnp.minimum(count / total_updates, 1.0).astype(jnp.float32)
        return 1.0 - (1.0 - alpha) * progress ** alpha_power

    def init(params):
        return LookaheadState(inner.init(params), params, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("lookahead needs the parameters in update()")
        fast_updates, inner_state = inner.update(updates, state.inner, params)
        fast = optax.apply_updates(params, fast_updates)
        count = state.count + 1
        sync = count % sync_period == 0
        a = alpha_at(count)
        slow = jax.tree.map(lambda s, f: jnp.where(sync, s + (a * (f - s)).astype(s.dtype), s), state.slow, fast)
        to_slow = sync | (count == total_updates)
        new = jax.tree.map(lambda s, f: jnp.where(to_slow, s, f), slow, fast)
        out = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new, params)
        return out, LookaheadState(inner_state, slow, count)

    return optax.GradientTransformation(init, update)


# -- the run's transformation ---------------------------------------------------------------------------
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
    multipliers = _patterns(opt_cfg, "lr_multipliers", lambda v: v > 0, "a positive number")
    frozen = _patterns(opt_cfg, "freeze_after", lambda v: 0 <= v <= 1, "a fraction of the run in [0, 1]")

    def build(plugin_cfg: Any, learning_rate: Any) -> optax.GradientTransformation:
        return OPTIMIZERS.build(cfg.optimizer.name, plugin_cfg, learning_rate=learning_rate, weight_decay_mask=mask)

    tx = with_lr_multipliers(build, opt_cfg, schedule, multipliers)
    if frozen:
        tx = optax.chain(tx, freeze_after(frozen, updates))
    if train.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    steps = getattr(opt_cfg, "lookahead_steps", 0)
    if steps:
        alpha, power = float(opt_cfg.lookahead_alpha), float(opt_cfg.lookahead_alpha_power)
        if steps < 0:
            raise ConfigError(f"optimizer.lookahead_steps must be >= 0, got {steps}")
        if not 0 < alpha <= 1:
            raise ConfigError(f"optimizer.lookahead_alpha must be in (0, 1], got {alpha}")
        if not power >= 0:
            raise ConfigError(f"optimizer.lookahead_alpha_power must be >= 0, got {power}")
        tx = lookahead(tx, int(steps), alpha, total_updates=updates, alpha_power=power)
    if train.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum_steps).gradient_transformation()
    return OptimizerBundle(tx=tx, schedule=schedule, updates=updates)
