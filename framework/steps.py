"""The pure step functions a run compiles: one training step, several training steps per call, one
evaluation step. Each is a function of arrays only (a :class:`TrainState` pytree and a batch); the model and
objective enter as an NNX graph definition, merged with the state's arrays inside the step.

Determinism: a step's PRNG key is ``fold_in(seed_key, state.step)``, so the numbers depend on the step,
never on how many steps one call runs (:func:`multi_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from prism.framework.api import DataInfo, Task
from prism.framework.augment import EPOCH_KEY, EXAMPLE_INDEX_KEY, Pipeline
from prism.framework.optim import OptimizerBundle


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree of arrays, checkpointed as a whole."""

    step: jax.Array  # micro-steps taken (one per batch)
    params: Any  # nnx.State of nnx.Param variables (fp32)
    rest: Any  # all other NNX state: BatchNorm statistics, RNG streams, EMA targets, ...
    opt_state: Any
    ema_params: Any  # parameter EMA (or None)
    bad_step: jax.Array  # first step (1-based, as logged) whose loss was not finite (-1: none)
    bad_steps: jax.Array  # how many steps were not applied because something they computed was not finite


#: Values of the :class:`TrainState` leaves that checkpoints written before those leaves existed lack
#: (``Checkpointer.restore(defaults=...)``): no step was skipped.
STATE_DEFAULTS = {".bad_steps": 0}


def cast_floats(tree: Any, dtype) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value of ``tree`` is finite (BatchNorm statistics, EMA targets, ...)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def restore_dtypes(tree: Any, like: Any) -> Any:
    return jax.tree.map(lambda x, ref: x.astype(ref.dtype), tree, like)


def prepare_images(batch: dict, info: DataInfo, dtype, pipeline: Pipeline | None = None,
                   key: jax.Array | None = None) -> dict:
    """uint8 images -> floats in [0, 1] -> ``pipeline`` (augmentations, then the dataset's mean/std
    normalization when it gives one) -> ``dtype``. Without a pipeline: normalization only."""
    batch = dict(batch)
    image = batch["image"]
    if jnp.issubdtype(image.dtype, jnp.integer):
        image = image.astype(jnp.float32) / 255.0
    batch["image"] = image.astype(jnp.float32)
    pipeline = pipeline or Pipeline([], info.mean, info.std)
    batch = pipeline(batch, key if key is not None else jax.random.key(0))
    batch["image"] = batch["image"].astype(dtype)
    return batch


def _guarded_update(state: TrainState, grads: Any, new_rest: Any, loss: jax.Array, tx: optax.GradientTransformation
                    ) -> tuple[Any, Any, Any, jax.Array, jax.Array]:
    """``(params, opt_state, rest, grad_norm, finite)``: the update applied only when the loss, the
    gradients and the new non-parameter state are all finite (else the old values kept)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_rest)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    return (keep(params, state.params), keep(opt_state, state.opt_state), keep(new_rest, state.rest),
            grad_norm, finite)


def batch_epochs(step: jax.Array, global_batch: int, epoch_length: int) -> jax.Array:
    """The epoch of each example of global batch ``step`` (0-based) in the training stream (int32)."""
    elements = step * global_batch + jnp.arange(global_batch, dtype=jnp.int32)
    return (elements // epoch_length).astype(jnp.int32)


def make_train_step(graphdef: Any, optimizer: OptimizerBundle, info: DataInfo, *, dtype, seed: int, accum: int,
                    ema_decay: float, pipeline: Pipeline, view_pipelines: list[Pipeline],
                    epoch_length: int) -> Callable:
    """``train_step(state, batch) -> (state, logs)``: augment, forward, backward, the guarded optimizer
    update and the parameter EMA, for one batch of uint8 images. The batch gains each example's epoch
    (``EPOCH_KEY``) from the step, the batch size and ``epoch_length`` (examples per epoch)."""
    tx, schedule = optimizer.tx, optimizer.schedule
    base_key = jax.random.key(seed + 1)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key, aug_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        batch = {**batch, EPOCH_KEY: batch_epochs(state.step, batch["image"].shape[0], epoch_length)}
        views = [prepare_images(batch, info, dtype, view, jax.random.fold_in(aug_key, 1 + i))["image"]
                 for i, view in enumerate(view_pipelines)]
        batch = prepare_images(batch, info, dtype, pipeline, aug_key)
        if views:
            batch["views"] = views

        def loss_fn(params):
            compute_params = cast_floats(params, dtype) if dtype != jnp.float32 else params
            system = nnx.merge(graphdef, compute_params, state.rest, copy=True)
            step = {"step": state.step} if getattr(system.objective, "takes_step", False) else {}
            loss, metrics = system.objective(system.model, batch, key, **step)
            _, _, new_rest = nnx.split(system, nnx.Param, ...)
            return loss.astype(jnp.float32), (metrics, new_rest)

        (loss, (metrics, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_rest = restore_dtypes(new_rest, state.rest)
        params, opt_state, new_rest, grad_norm, finite = _guarded_update(state, grads, new_rest, loss, tx)
        ema = state.ema_params
        if ema is not None:  # once per optimizer update (not per accumulated micro-batch)
            updated = (state.step + 1) % accum == 0
            ema = jax.tree.map(lambda e, p: jnp.where(updated, ema_decay * e + (1 - ema_decay) * p, e),
                               ema, params)
        bad = jnp.where((state.bad_step < 0) & ~finite, state.step + 1, state.bad_step)
        new_state = TrainState(state.step + 1, params, new_rest, opt_state, ema, bad,
                               state.bad_steps + (~finite).astype(jnp.int32))
        logs = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": schedule(state.step // accum),
                **{f"train/{k}": v for k, v in metrics.items()}}
        return new_state, logs

    return train_step


def multi_step(train_step: Callable, *, max_steps: int, batch_sharding: NamedSharding) -> Callable:
    """``steps(state, arrays, indices, count) -> (state, logs)``: ``count`` (<= ``max_steps``, a traced
    value: one program serves every count) training steps in one call, step ``i`` on the examples
    ``indices[i]`` gathered from the device-resident ``arrays``. ``logs`` holds every step's metrics,
    stacked: ``[max_steps]`` per name, rows past ``count`` zero."""

    def steps(state: TrainState, arrays: dict, indices: jax.Array, count: jax.Array) -> tuple[TrainState, dict]:
        def gather(i):
            batch = {k: jnp.take(v, indices[i], axis=0) for k, v in arrays.items()}
            return jax.lax.with_sharding_constraint({**batch, EXAMPLE_INDEX_KEY: indices[i]}, batch_sharding)

        logs_shape = jax.eval_shape(train_step, state, gather(0))[1]
        logs = jax.tree.map(lambda s: jnp.zeros((max_steps, *s.shape), s.dtype), logs_shape)

        def body(i, carry):
            state, logs = carry
            state, step_logs = train_step(state, gather(i))
            return state, jax.tree.map(lambda all_, one: all_.at[i].set(one), logs, step_logs)

        return jax.lax.fori_loop(0, count, body, (state, logs))

    return steps


def multi_eval(eval_step: Callable, *, batch_sharding: NamedSharding) -> Callable:
    """``evaluate(state, arrays, indices) -> outputs``: ``eval_step`` over every batch of a device-resident
    split in one program, batch ``b`` being the examples ``indices[b]``; outputs stacked ``[batches, ...]``."""

    def evaluate(state: TrainState, arrays: dict, indices: jax.Array) -> tuple[dict, dict]:
        def one(batch_indices):
            batch = {k: jnp.take(v, batch_indices, axis=0) for k, v in arrays.items()}
            return eval_step(state, jax.lax.with_sharding_constraint(batch, batch_sharding))

        return jax.lax.map(one, indices)

    return evaluate


def evaluation_system(state: TrainState, eval_graphdef: Any, dtype) -> nnx.Module:
    """The system in evaluation mode with the weights evaluation uses (the EMA ones when kept), in ``dtype``."""
    params = state.ema_params if state.ema_params is not None else state.params
    compute_params = cast_floats(params, dtype) if dtype != jnp.float32 else params
    return nnx.merge(eval_graphdef, compute_params, state.rest, copy=True)


def make_eval_step(eval_graphdef: Any, task: Task, info: DataInfo, *, dtype) -> Callable:
    """``eval_step(state, batch) -> (task outputs, objective outputs)`` per example (see
    ``Task.eval_outputs`` and ``Objective.eval_outputs``), with the EMA parameters when kept."""

    def eval_step(state: TrainState, batch: dict) -> tuple[dict, dict]:
        system = evaluation_system(state, eval_graphdef, dtype)
        batch = prepare_images(batch, info, dtype)
        for key in getattr(task, "extra_image_keys", ()):
            batch[key] = prepare_images({"image": batch[key]}, info, dtype)["image"]
        extra_args = {"objective": system.objective} if getattr(task, "takes_objective", False) else {}
        outputs = task.eval_outputs(system.model, batch, **extra_args)
        objective_outputs = getattr(system.objective, "eval_outputs", None)
        extra = objective_outputs(system.model, batch) if objective_outputs is not None else {}
        return as_float32(outputs), as_float32(extra)

    return eval_step


def make_predict_step(eval_graphdef: Any, task: Task, info: DataInfo, *, dtype) -> Callable:
    """``predict_step(state, batch of uint8 images) -> the task's predict_outputs`` (no labels needed)."""

    def predict_step(state: TrainState, batch: dict) -> dict:
        system = evaluation_system(state, eval_graphdef, dtype)
        return as_float32(task.predict_outputs(system.model, prepare_images(batch, info, dtype)))

    return predict_step


def as_float32(outputs: dict) -> dict:
    return {k: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in outputs.items()}


__all__ = ["STATE_DEFAULTS", "TrainState", "all_finite", "cast_floats", "evaluation_system", "make_eval_step",
           "make_predict_step", "make_train_step", "multi_eval", "multi_step", "prepare_images"]
