"""orbax checkpoints of a run: async save, keep the last K plus the best, resume, refuse mismatches.

The train state (a pytree of arrays) is stored as a flat ``{path: array}`` dict, so any pytree an
optimizer or plugin produces round-trips, and a checkpoint of another model is detected by comparing
paths and shapes before restoring (the error names the first mismatching tensor). Beside it each
checkpoint holds the input pipeline's state and a JSON ``meta`` record. orbax writes to a temporary
directory and renames it when complete, so a run killed mid-save never leaves a half checkpoint behind.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from prism.framework.config import CheckpointConfig
from prism.framework.errors import CheckpointError


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` with typed PRNG keys stored as their raw key data."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[jax.tree_util.keystr(path)] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    return flat


def _abstract_flat(abstract_tree: Any) -> dict[str, Any]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]:
        if _is_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
            leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=None)
        flat[jax.tree_util.keystr(path)] = leaf
    return flat


def unflatten_state(flat: dict[str, Any], like: Any) -> Any:
    """Rebuild a pytree shaped like ``like`` from :func:`flatten_state`'s output."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, ref in leaves_with_path:
        value = flat[jax.tree_util.keystr(path)]
        if _is_key(ref):
            # jax.random.key_impl accepts only concrete keys; the restore target is abstract
            impl = ref.dtype._impl if isinstance(ref, jax.ShapeDtypeStruct) else jax.random.key_impl(ref)
            value = jax.random.wrap_key_data(jnp.asarray(value), impl=impl)
            if getattr(ref, "sharding", None) is not None:
                value = jax.device_put(value, ref.sharding)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def signature(abstract_tree: Any) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of a state: what a compatible checkpoint must contain."""
    return {k: [list(v.shape), str(v.dtype)] for k, v in _abstract_flat(abstract_tree).items()}


def first_mismatch(expected: dict[str, list], found: dict[str, list]) -> str | None:
    """A sentence naming the first tensor that differs between two signatures, or None."""
    for path, (shape, _dtype) in expected.items():
        if path not in found:
            return f"tensor {path} (expected shape {tuple(shape)}) is missing from the checkpoint"
        if list(found[path][0]) != list(shape):
            return (f"tensor {path} has shape {tuple(found[path][0])} in the checkpoint, "
                    f"expected {tuple(shape)}")
    extra = [p for p in found if p not in expected]
    if extra:
        return f"the checkpoint holds tensor {extra[0]}, which this model does not have"
    return None


#: The notice orbax's ``CheckpointManager`` logs (through absl) whenever it is opened with ``read_only=True``.
READ_ONLY_NOTICE = "Given directory is read only=%s"


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != READ_ONLY_NOTICE


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
    """Drop orbax's warning that a read-only manager is read-only (``prism eval`` opens one on purpose and
    printed it twice per run); only that message, only while the manager is created."""
    from absl import logging as absl_logging

    logger, notice_filter = absl_logging.get_absl_logger(), _DropReadOnlyNotice()
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


class Checkpointer:
    """The run's ``checkpoints/`` directory, managed by an orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False) -> None:
        """``read_only``: open another run's checkpoints to restore from them (``prism eval``); nothing is
        saved or deleted."""
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        if cfg.best_mode not in ("max", "min"):
            raise CheckpointError(f"checkpoint.best_mode must be 'max' or 'min', got {cfg.best_mode!r}")
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(cfg.keep, 1))]
        if cfg.best_metric:
            policies.append(pp.BestN(
                get_metric_fn=lambda metrics: metrics[cfg.best_metric],
                reverse=cfg.best_mode == "min",  # BestN keeps the tail of the sorted list
                n=1,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save and not read_only,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
            best_fn=(lambda metrics: metrics[cfg.best_metric]) if cfg.best_metric else None,
            best_mode=cfg.best_mode,
            read_only=read_only,
        )
        with _quiet_read_only_notice() if read_only else contextlib.nullcontext():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.cfg.best_metric else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, *, data_state: Any = None, meta: dict | None = None,
             metrics: dict[str, float] | None = None) -> None:
        """Save asynchronously (returns at once when ``async_save``); ``metrics`` rank the best."""
        if metrics is not None and self.cfg.best_metric and self.cfg.best_metric not in metrics:
            raise CheckpointError(
                f"checkpoint.best_metric={self.cfg.best_metric!r} is not among the evaluation metrics "
                f"({', '.join(sorted(metrics))})"
            )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flatten_state(state)),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, abstract_state: Any, *, meta_check: dict | None = None
                ) -> tuple[Any, Any, dict]:
        """Restore ``(state, data_state, meta)`` at ``step`` into ``abstract_state``'s shapes/shardings.

        Raises :class:`CheckpointError` naming the first mismatching tensor when the checkpoint was
        written by a different model or optimizer.
        """
        meta = self.read_meta(step)
        expected = signature(abstract_state)
        found = meta.get("signature")
        problem = first_mismatch(expected, found) if found is not None else None
        if problem:
            raise CheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not fit this run: {problem}. "
                f"It was written for model {meta.get('model', '?')!r}; this run builds "
                f"{(meta_check or {}).get('model', '?')!r}. Use a new run directory, or the config "
                f"that wrote it."
            )
        abstract_flat = _abstract_flat(abstract_state)
        target = {k: ocp.utils.to_shape_dtype_struct(v) if not hasattr(v, "sharding") else v
                  for k, v in abstract_flat.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ))
        except Exception as exc:  # orbax's messages name internals; ours names the directory
            raise CheckpointError(
                f"could not restore the checkpoint at step {step} in {self.directory}: {exc}"
            ) from exc
        state = unflatten_state(dict(restored["state"]), abstract_state)
        return state, restored["data"], dict(restored["meta"])

    def wait(self) -> None:
        """Block until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def host_scalars(tree: dict[str, Any]) -> dict[str, float]:
    """Device scalars -> Python floats (for JSON and metric ranking)."""
    return {k: float(np.asarray(v)) for k, v in tree.items()}
