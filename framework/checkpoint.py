"""orbax checkpoints of a run: async save, keep the last K plus the best, verified restore, resume, refuse mismatches.

On-disk format (version 2): each ``checkpoints/STEP`` directory holds the items ``state`` (the train state as
a nested dict with one plain string key per pytree level, e.g. ``params/model/convs/0/kernel``, so orbax's own
tree metadata describes it), ``data`` (the input pipeline's state, JSON) and ``meta`` (JSON); the step's
orbax metadata carries ``{"prism_checkpoint_format": 2}``; once the save is complete, ``prism_checksums.json``
lists the SHA-256 of every file of the step.

Version 1 (before the marker) stored the state flat, keyed by ``jax.tree_util.keystr`` of each leaf's path;
it still restores. A checkpoint of another model is detected by comparing the tree metadata with the target
before restoring (the error names the first mismatching tensor). orbax writes to a temporary directory and
renames it when complete, so a run killed mid-save never leaves a half checkpoint behind; the checksums catch
what goes bad afterwards, and :meth:`Checkpointer.restore_latest` falls back to the newest usable step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from prism.framework.config import CheckpointConfig
from prism.framework.errors import CheckpointError, NonFiniteLossError

log = logging.getLogger("prism.checkpoint")

#: Key of the format version in each step's orbax custom metadata (absent: version 1, the flat keystr layout).
FORMAT_KEY = "prism_checkpoint_format"
FORMAT = 2
#: Written into a step directory once its save is complete: ``{"algorithm": "sha256", "files": {path: hex}}``.
CHECKSUMS_FILE = "prism_checksums.json"
#: Room a save needs beyond its arrays: orbax's metadata, the data-iterator state, the config and checksums.
SAVE_OVERHEAD_BYTES = 1 << 20
#: Suffix of a step directory that :meth:`Checkpointer.restore_latest` moved aside as unusable.
CORRUPT_SUFFIX = ".corrupt"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint that cannot be used as it is on disk: checksum mismatch, unreadable, or non-finite values."""


# -- the state as orbax sees it -------------------------------------------------------------------------------
def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.result_type(x)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _entry_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def state_leaves(tree: Any) -> list[tuple[tuple[str, ...], str, Any]]:
    """``(key path, display name, leaf)`` of every leaf of ``tree``, in ``jax.tree.leaves`` order.

    The key path has one plain string per level (an ``nnx.Variable`` is one level, its value: a parameter is
    ``("params", "model", "convs", "0", "kernel")``); the display name is ``jax.tree_util.keystr`` of the
    leaf's path (``.params['model']['convs'][0]['kernel'].value``), the key of format version 1.
    """
    out = []
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)[0]:
        keys = tuple(_entry_name(e) for e in path)
        if _is_variable(node):
            for sub, leaf in jax.tree_util.tree_flatten_with_path(node)[0]:
                inner = tuple(_entry_name(e) for e in sub)
                out.append((keys + (() if inner == ("value",) else inner), jax.tree_util.keystr(path + sub), leaf))
        else:
            out.append((keys, jax.tree_util.keystr(path), node))
    return out


def _stored(leaf: Any) -> Any:
    """What is written for ``leaf``: typed PRNG keys as their raw key data (concrete or abstract)."""
    if not _is_key(leaf):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=None)
    return jax.random.key_data(leaf)


def _nest(items: list[tuple[tuple[str, ...], Any]]) -> dict:
    nested: dict = {}
    for keys, value in items:
        if not keys:
            raise CheckpointError("a checkpointed state must be a container of arrays, not a single array")
        node = nested
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"two leaves of the state share the checkpoint key {'/'.join(keys[:i + 1])}")
        if keys[-1] in node:
            raise CheckpointError(f"two leaves of the state share the checkpoint key {'/'.join(keys)}")
        node[keys[-1]] = value
    return nested


def _lookup(nested: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        nested = nested[k]
    return nested


def flatten_nested(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """``{(key, subkey, ...): leaf}`` of nested dicts (any other value is a leaf)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten_nested(v, (*prefix, str(k))))
        return out
    return {prefix: tree}


def to_nested(tree: Any) -> dict:
    """The nested ``{str: ... {str: array}}`` dict that format 2 saves for ``tree``."""
    return _nest([(keys, _stored(leaf)) for keys, _, leaf in state_leaves(tree)])


def _target(abstract_tree: Any, version: int, absent: Collection[str] = ()) -> dict:
    """orbax's restore target for ``abstract_tree``: shapes, dtypes and shardings, in the layout of ``version``
    (the leaves named in ``absent`` left out)."""
    def spec(leaf: Any) -> Any:
        leaf = _stored(leaf)
        return leaf if hasattr(leaf, "sharding") else ocp.utils.to_shape_dtype_struct(leaf)

    entries = [entry for entry in state_leaves(abstract_tree) if entry[1] not in absent]
    if version == 1:
        return {name: spec(leaf) for _, name, leaf in entries}
    return _nest([(keys, spec(leaf)) for keys, _, leaf in entries])


def _rebuild(restored: dict, abstract_tree: Any, version: int, filled: Mapping[str, Any] | None = None) -> Any:
    """The pytree shaped like ``abstract_tree`` from orbax's restored dict; leaves named in ``filled`` (absent
    from the checkpoint) get that value."""
    leaves = []
    filled = filled or {}
    for keys, name, ref in state_leaves(abstract_tree):
        if name in filled:
            leaves.append(jax.device_put(jnp.full(ref.shape, filled[name], ref.dtype), getattr(ref, "sharding", None)))
            continue
        value = restored[name] if version == 1 else _lookup(restored, keys)
        if _is_key(ref):
            # jax.random.key_impl accepts only concrete keys; the restore target is abstract
            impl = ref.dtype._impl if isinstance(ref, jax.ShapeDtypeStruct) else jax.random.key_impl(ref)
            value = jax.random.wrap_key_data(jnp.asarray(value), impl=impl)
            if getattr(ref, "sharding", None) is not None:
                value = jax.device_put(value, ref.sharding)
        leaves.append(value)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_tree), leaves)


def signature(abstract_tree: Any) -> dict[str, list]:
    """``{path: [shape, dtype]}`` of a state (display names, see :func:`state_leaves`): a human-readable record
    for ``meta``. Compatibility is checked against orbax's tree metadata, not this."""
    out = {}
    for _, name, leaf in state_leaves(abstract_tree):
        leaf = jax.eval_shape(jax.random.key_data, leaf) if _is_key(leaf) else leaf
        out[name] = [list(np.shape(leaf)), str(_dtype(leaf))]
    return out


@jax.jit
def _finite_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def first_nonfinite(tree: Any) -> str | None:
    """Display name of the first float array of ``tree`` holding a NaN or infinity (None: all finite)."""
    floats = [(name, leaf) for _, name, leaf in state_leaves(tree)
              if not _is_key(leaf) and jnp.issubdtype(_dtype(leaf), jnp.inexact)]
    if not floats:
        return None
    flags = _finite_flags([leaf for _, leaf in floats])
    if not flags.is_fully_addressable and not flags.is_fully_replicated:  # several processes
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(flags, tiled=True)
    flags = np.asarray(jax.device_get(flags))
    bad = np.flatnonzero(~flags)
    return floats[int(bad[0])][0] if bad.size else None


def _mismatch(expected: list[tuple[tuple[str, ...], str, tuple]], found: dict[tuple[str, ...], tuple]) -> str | None:
    """A sentence naming the first tensor that differs between the target and the checkpoint, or None."""
    for keys, name, shape in expected:
        if keys not in found:
            return f"tensor {name} (expected shape {tuple(shape)}) is missing from the checkpoint"
        if tuple(found[keys]) != tuple(shape):
            return f"tensor {name} has shape {tuple(found[keys])} in the checkpoint, expected {tuple(shape)}"
    known = {keys for keys, _, _ in expected}
    extra = [k for k in found if k not in known]
    if extra:
        return f"the checkpoint holds tensor {'/'.join(extra[0])}, which this model does not have"
    return None


# -- checksums ------------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)


def write_checksums(step_dir: str | Path) -> Path:
    """Write ``CHECKSUMS_FILE`` into a complete step directory (atomically: a temporary file renamed)."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): _sha256(p) for p in _files(step_dir)}
    out = step_dir / CHECKSUMS_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1))
    os.replace(tmp, out)
    return out


def verify_checksums(step_dir: str | Path) -> str | None:
    """Check a step directory against its ``CHECKSUMS_FILE``: None when it has none, ``"ok"`` when every listed
    file is there with its checksum; otherwise raises :class:`CorruptCheckpointError` naming the first bad file."""
    step_dir = Path(step_dir)
    listing = step_dir / CHECKSUMS_FILE
    if not listing.is_file():
        return None
    try:
        record = json.loads(listing.read_text())
        files = dict(record["files"])
        if record.get("algorithm") != "sha256":
            raise ValueError(f"unknown algorithm {record.get('algorithm')!r}")
    except Exception as exc:
        raise CorruptCheckpointError(f"its {CHECKSUMS_FILE} is unreadable ({exc})") from exc
    for rel, digest in files.items():
        path = step_dir / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"file {rel} is missing")
        if _sha256(path) != digest:
            raise CorruptCheckpointError(f"checksum mismatch in {rel}")
    return "ok"


# -- orbax -----------------------------------------------------------------------------------------------------
#: The notice orbax's ``CheckpointManager`` logs (through absl) whenever it is opened with ``read_only=True``.
READ_ONLY_NOTICE = "Given directory is read only=%s"


#: orbax's warning for a save without metrics while a best metric is tracked: prism saves between evaluations
#: on purpose (``checkpoint.every`` off the evaluation cadence); such steps are kept as the latest, not ranked.
TRACKED_METRIC_NOTICE = "Requested `tracked_metric`; did not provide metrics."


class _DropNotices(logging.Filter):
    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in self.messages


@contextlib.contextmanager
def _quiet(*messages: str) -> Iterator[None]:
    """Drop orbax notices that describe what prism does on purpose (a read-only manager for ``prism eval``, a
    save between evaluations); only those messages, only inside the block."""
    from absl import logging as absl_logging

    logger, notice_filter = absl_logging.get_absl_logger(), _DropNotices(messages)
    logger.addFilter(notice_filter)
    try:
        yield
    finally:
        logger.removeFilter(notice_filter)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


class Checkpointer:
    """The run's ``checkpoints/`` directory, managed by an orbax ``CheckpointManager``."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, read_only: bool = False) -> None:
        """``read_only``: open another run's checkpoints to restore from them (``prism eval``); nothing is
        saved, deleted, sealed or moved."""
        self.directory = Path(directory).absolute()
        self.cfg = cfg
        self.read_only = read_only
        #: One line per remark of the last :meth:`restore` / :meth:`restore_latest` (unverified, skipped steps).
        self.notes: list[str] = []
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
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
        with _quiet(READ_ONLY_NOTICE) if read_only else contextlib.nullcontext():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.cfg.best_metric else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    # -- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, *, data_state: Any = None, meta: dict | None = None,
             metrics: dict[str, float] | None = None) -> None:
        """Save asynchronously (returns at once when ``async_save``); ``metrics`` rank the best.

        Refuses (:class:`NonFiniteLossError`) a state holding a NaN or infinite float array. The checksums of
        a step are written once its save is complete: at once for a synchronous save, else at the next save
        or :meth:`close`.
        """
        if metrics is not None and self.cfg.best_metric and self.cfg.best_metric not in metrics:
            raise CheckpointError(
                f"checkpoint.best_metric={self.cfg.best_metric!r} is not among the evaluation metrics "
                f"({', '.join(sorted(metrics))})"
            )
        bad = first_nonfinite(state)
        if bad is not None:
            last = self.latest_step()
            kept = f"the last checkpoint is step {last}" if last is not None else "no checkpoint was written"
            raise NonFiniteLossError(f"refusing to save the checkpoint at step {step} in {self.directory}: array "
                                     f"{bad} holds NaN or inf values; {kept}")
        self._seal()
        self._check_space(step, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(to_nested(state)),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta or {}),
        )
        with _quiet(TRACKED_METRIC_NOTICE):
            self.manager.save(step, args=args, metrics=metrics, force=True, custom_metadata={FORMAT_KEY: FORMAT})
        self._unsealed.append(step)
        if not self.cfg.async_save:
            self._seal()

    def _check_space(self, step: int, state: Any) -> None:
        """Refuse (one line) a save the disk has no room for: orbax would fail in background threads, each
        printing its traceback, and leave a partial step behind."""
        needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state)) // max(jax.process_count(), 1)
        needed = int(needed * 1.1) + SAVE_OVERHEAD_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < needed:
            last = self.latest_step()
            kept = f"the last checkpoint, step {last}, is kept" if last is not None else "no checkpoint was written"
            raise CheckpointError(f"no space for the checkpoint at step {step} in {self.directory}: it needs about "
                                  f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free ({kept}); free space, "
                                  f"lower checkpoint.keep or choose another hydra.run.dir")

    def _seal(self) -> None:
        """Wait for pending saves, then write the checksums of the steps saved since the last seal."""
        if self.read_only or not self._unsealed:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in self._unsealed:
                step_dir = self.step_dir(step)
                if step_dir.is_dir() and not (step_dir / CHECKSUMS_FILE).exists():
                    write_checksums(step_dir)
        self._unsealed.clear()

    # -- reading -----------------------------------------------------------------------------------------
    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def format_version(self, step: int) -> int:
        """The on-disk format of ``step``'s state (1: flat keystr keys, written before the format marker)."""
        custom = self.manager.metadata(step).custom_metadata or {}
        return int(custom.get(FORMAT_KEY, 1))

    def tree_shapes(self, step: int) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
        """``{key path: (shape, dtype)}`` of the saved state, from orbax's tree metadata (format 1: each path
        is the one flat key)."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(self.step_dir(step) / "state").tree
        finally:
            handler.close()
        return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten_nested(tree).items()}

    def read_arrays(self, step: int, keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], np.ndarray]:
        """Only the arrays at ``keys`` (paths of :meth:`tree_shapes`) of ``step``'s state, as NumPy arrays
        (an orbax partial restore: nothing else is read)."""
        if not keys:
            return {}
        shapes = self.tree_shapes(step)
        version = self.format_version(step)
        items = [(k, np.zeros(shapes[k][0], shapes[k][1])) for k in keys]
        target = {k[0]: v for k, v in items} if version == 1 else _nest(items)
        restore_args = jax.tree.map(lambda v: ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype), target)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(self.step_dir(step) / "state", args=ocp.args.PyTreeRestore(
                target, restore_args=restore_args, partial_restore=True))
        return {k: np.asarray(restored[k[0]] if version == 1 else _lookup(restored, k)) for k in keys}

    def verify(self, step: int) -> str | None:
        """Check ``step`` against its checksums. Returns a note when it has none (written by an older prism, or
        the run ended before its save was sealed) and None when it passes; raises
        :class:`CorruptCheckpointError` when a file is missing or differs."""
        self._seal()
        try:
            status = verify_checksums(self.step_dir(step))
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"the checkpoint at step {step} in {self.directory} is corrupt: {exc}"
                                         ) from None
        if status is None:
            return (f"the checkpoint at step {step} in {self.directory} has no {CHECKSUMS_FILE} (written by an "
                    f"older prism, or the run ended before sealing it): restored without verification")
        return None

    def restore(self, step: int, abstract_state: Any, *, meta_check: dict | None = None,
                defaults: Mapping[str, Any] | None = None) -> tuple[Any, Any, dict]:
        """Restore ``(state, data_state, meta)`` at ``step`` into ``abstract_state``'s shapes/shardings.

        Verifies the step's checksums first (when it has them) and every restored float array after.
        Raises :class:`CheckpointError` naming the first mismatching tensor when the checkpoint was written by
        a different model or optimizer, and :class:`CorruptCheckpointError` (a ``CheckpointError``) when the
        checkpoint is corrupt, unreadable or holds NaN/inf. Remarks (no checksums) go to :attr:`notes`.
        ``defaults``: ``{display name: value}`` of leaves a checkpoint written before they existed may lack (a
        counter added to the train state): they are filled with that value instead of refusing the checkpoint.
        """
        self.notes = []
        return self._restore(step, abstract_state, meta_check, self.notes, defaults or {})

    def _restore(self, step: int, abstract_state: Any, meta_check: dict | None, notes: list[str],
                 defaults: Mapping[str, Any]) -> tuple[Any, Any, dict]:
        where = f"the checkpoint at step {step} in {self.directory}"
        note = self.verify(step)
        if note:
            notes.append(note)
            log.info(note)
        try:
            meta = self.read_meta(step)
            version = self.format_version(step)
            found = {k: shape for k, (shape, _) in self.tree_shapes(step).items()}
        except Exception as exc:
            raise CorruptCheckpointError(f"{where} is unreadable: {_one_line(exc)}") from exc
        expected = [((name,) if version == 1 else keys, name, tuple(np.shape(_stored(leaf))))
                    for keys, name, leaf in state_leaves(abstract_state)]
        absent = {name for keys, name, _ in expected if name in defaults and keys not in found}
        problem = _mismatch([e for e in expected if e[1] not in absent], found)
        if problem:
            raise CheckpointError(
                f"{where} does not fit this run: {problem}. It was written for model {meta.get('model', '?')!r}; "
                f"this run builds {(meta_check or {}).get('model', '?')!r}. Use a new run directory, or the "
                f"config that wrote it."
            )
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_target(abstract_state, version, absent)),
                data=ocp.args.JsonRestore(),
            ))
        except Exception as exc:  # orbax's messages name internals; ours names the directory
            raise CorruptCheckpointError(f"could not restore {where}: {_one_line(exc)}") from exc
        state = _rebuild(dict(restored["state"]), abstract_state, version, {n: defaults[n] for n in absent})
        bad = first_nonfinite(state)
        if bad is not None:
            raise CorruptCheckpointError(f"{where} holds NaN or inf values (array {bad})")
        return state, restored["data"], meta

    def restore_latest(self, abstract_state: Any, *, meta_check: dict | None = None,
                       defaults: Mapping[str, Any] | None = None) -> tuple[int, Any, Any, dict] | None:
        """``(step, state, data_state, meta)`` of the newest usable checkpoint; None when there is none.

        A step that is corrupt or unreadable (see :meth:`restore`) is skipped with a note naming it and why, and
        the previous one is tried; in a writable checkpointer the skipped steps are moved aside to
        ``STEP.corrupt`` (the run will save those steps again). Raises :class:`CheckpointError` when checkpoints
        exist but none is usable, and at once when one was written by another model. Notes go to
        :attr:`notes` and to the ``prism.checkpoint`` logger.
        """
        self._seal()
        self.notes = []
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        skipped: list[tuple[int, str]] = []
        for step in steps:
            try:
                state, data_state, meta = self._restore(step, abstract_state, meta_check, self.notes, defaults or {})
            except CorruptCheckpointError as exc:
                reason = str(exc)
                skipped.append((step, reason))
                self._note(f"skipping checkpoint step {step}: {reason}")
                continue
            if skipped:
                moved = self._move_aside([s for s, _ in skipped])
                self._note(f"restored step {step}, the latest usable checkpoint in {self.directory} (skipped "
                           f"step{'s' if len(skipped) > 1 else ''} {', '.join(str(s) for s, _ in skipped)}"
                           f"{'; moved aside to ' + ', '.join(moved) if moved else ''})")
            return step, state, data_state, meta
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} is usable ("
            + "; ".join(f"step {s}: {r}" for s, r in skipped)
            + "); delete that directory or use a new run directory to start from step 0")

    def _note(self, text: str) -> None:
        self.notes.append(text)
        log.warning(text)

    def _move_aside(self, steps: list[int]) -> list[str]:
        """Rename unusable step directories to ``STEP.corrupt`` (writable checkpointer, main process)."""
        if self.read_only:
            return []
        moved = []
        if jax.process_index() == 0:
            for step in steps:
                source = self.step_dir(step)
                target = source.with_name(source.name + CORRUPT_SUFFIX)
                n = 1
                while target.exists():
                    n += 1
                    target = source.with_name(f"{source.name}{CORRUPT_SUFFIX}{n}")
                source.rename(target)
                moved.append(target.name)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("prism_checkpoint_move_aside")
        self.manager.reload()
        return moved or [f"{s}{CORRUPT_SUFFIX}" for s in steps]

    def close(self) -> None:
        self._seal()
        self.manager.wait_until_finished()
        self.manager.close()
