"""Evaluation of a Run's state: a task's outputs over a split, its metrics, its pictures; and the run's
evaluators (the ``evals`` config, big_vision style), each a task on a split at its own cadence.

:class:`Evaluation` compiles one evaluation step per task (and, for device-resident splits, one program for
the whole split) and is used by ``prism train`` (every evaluator), ``prism eval`` and the tests alike. Tasks
with the same :meth:`~prism.framework.api.Task.eval_outputs_key` (kNN and the linear probe: the frozen
backbone's features) share one computation of their outputs per split while the state does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from prism.framework import parallel
from prism.framework.api import DataSource, Task
from prism.framework.config import config_node
from prism.framework.data import VALID_KEY, eval_batches
from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS, TASKS
from prism.framework.run import Run, build_plugin
from prism.framework.steps import TrainState, make_eval_step, multi_eval
from prism.framework.validate import validate_node

#: The evaluator a run has when ``evals`` is not set; its metrics are logged as ``eval/<metric>``.
MAIN = "main"
EVALUATOR_KEYS = ("task", "split", "every", "every_epochs", "task_overrides", "dataset")


class Evaluation:
    """Metrics, outputs and pictures of tasks over the splits of ``run``'s dataset (or of another dataset,
    ``source``: read on the host, its ``"train"`` reference meaning ``train_split``), for a state passed in."""

    def __init__(self, run: Run, source: DataSource | None = None, train_split: str = "train") -> None:
        self.run = run
        self.source = source
        self.train_split = train_split
        #: id(task) -> (task, kept alive so that ids stay unique; its one-batch and whole-split programs)
        self._programs: dict[int, tuple[Task, Callable, Callable]] = {}

    def programs(self, task: Task) -> tuple[Callable, Callable]:
        """``(one batch, a whole device-resident split)``: the jitted evaluation programs of ``task``."""
        if id(task) not in self._programs:
            run = self.run
            eval_step = make_eval_step(run.eval_graphdef, task, run.info, dtype=run.compute_dtype)
            batches = parallel.batch_sharding(run.mesh)
            whole = multi_eval(eval_step, batch_sharding=batches)
            self._programs[id(task)] = (task, jax.jit(eval_step, out_shardings=batches),
                                        jax.jit(whole, out_shardings=parallel.steps_batch_sharding(run.mesh)))
        return self._programs[id(task)][1:]

    def _host_batches(self, split, max_batches: int, raw: list):
        """``(global batch, this host's validity mask)`` over ``split`` read on the host; the first batch's
        valid examples are appended to ``raw`` (render draws them)."""
        run = self.run
        for host_batch in eval_batches(split, global_batch=run.eval_batch_size, host=run.eval_host,
                                       max_batches=max_batches):
            valid = host_batch.pop(VALID_KEY)
            if not raw:
                raw.append({k: np.asarray(v)[np.asarray(valid, bool)] for k, v in host_batch.items()})
            yield parallel.global_batch(run.mesh, host_batch), valid

    def _whole_resident_split(self, state: TrainState, split_name: str, task: Task, max_batches: int):
        """Outputs over a device-resident split from one program, fetched once (single-process runs)."""
        run = self.run
        resident = run.resident(split_name)
        indices, valid = resident.eval_indices(global_batch=run.eval_batch_size, host=run.eval_host,
                                               max_batches=max_batches)
        outputs = jax.device_get(self.programs(task)[1](state, resident.arrays, resident.step_indices(indices)))
        keep = valid.reshape(-1)
        return tuple({k: np.asarray(v).reshape(-1, *v.shape[2:])[keep] for k, v in part.items()} for part in outputs)

    def outputs(self, state: TrainState, split_name: str, task: Task, *, first_batch_only: bool = False
                ) -> tuple[dict, dict, dict]:
        """``(task outputs, objective outputs, raw host batch of the first batch)`` over the split named
        ``split_name``, padding removed; every host gets the whole split's outputs. A device-resident split is
        evaluated from device memory (no raw batch); ``first_batch_only`` reads one batch on the host."""
        run = self.run
        max_batches = 1 if first_batch_only else run.cfg.train.max_eval_batches
        on_device = run.placement == "device" and not first_batch_only and self.source is None
        if on_device and jax.process_count() == 1:
            task_out, objective_out = self._whole_resident_split(state, split_name, task, max_batches)
            return task_out, objective_out, {}
        raw: list[dict] = []
        if on_device:
            batches = run.resident(split_name).eval_batches(global_batch=run.eval_batch_size, host=run.eval_host,
                                                            max_batches=max_batches)
        else:
            split = run.split(split_name) if self.source is None else self.source.split(split_name)
            batches = self._host_batches(split, max_batches, raw)
        collected: tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]] = ({}, {})
        eval_step = self.programs(task)[0]
        for batch, valid in batches:
            for part, into in zip(parallel.valid_outputs(eval_step(state, batch), valid), collected, strict=True):
                for name, value in part.items():
                    into.setdefault(name, []).append(value)
        task_out, objective_out = ({name: np.concatenate(parts) for name, parts in c.items()} for c in collected)
        return task_out, objective_out, raw[0] if raw else {}

    def shared_outputs(self, state: TrainState, split_name: str, task: Task, shared: dict | None
                       ) -> tuple[dict, dict]:
        """``(task outputs, objective outputs)`` over ``split_name``, taken from ``shared`` when a task with the
        same ``eval_outputs_key`` already computed them there (stored read-only, for the next task)."""
        key = task.eval_outputs_key() if shared is not None else None
        if key is not None and (split_name, key) in shared:
            return shared[(split_name, key)]
        task_out, objective_out, _ = self.outputs(state, split_name, task)
        if key is not None:
            for array in (*task_out.values(), *objective_out.values()):
                array.flags.writeable = False
            shared[(split_name, key)] = (task_out, objective_out)
        return task_out, objective_out

    def reference_split_name(self, task: Task) -> str:
        """The task's reference split; ``"train"`` is the split this run trains on (``dataset.train_split``),
        so a held-out evaluation slice of the same TFDS split never enters a kNN bank or a probe's data."""
        name = task.reference_split
        if name != "train":
            return name
        return self.run.cfg.dataset.train_split if self.source is None else self.train_split

    def metrics(self, state: TrainState, task: Task, *, split_name: str | None = None, shared: dict | None = None,
                prefix: str = "eval", task_name: str | None = None, with_objective: bool = True) -> dict[str, float]:
        """The task's metrics over the split (default: the evaluation split; padding masked out), on every host,
        plus (``with_objective``) the means of the objective's evaluation outputs, as ``<prefix>/<metric>``. A
        task with a ``reference_split`` also gets its outputs over that split. ``shared``: see
        :meth:`shared_outputs`."""
        run = self.run
        split_name = split_name or run.cfg.dataset.eval_split
        task_out, objective_out = self.shared_outputs(state, split_name, task, shared)
        if task.reference_split:
            reference, _ = self.shared_outputs(state, self.reference_split_name(task), task, shared)
            metrics = dict(task.summarize(task_out, reference=reference))
        else:
            metrics = dict(task.summarize(task_out))
        clash = sorted(set(metrics) & set(objective_out))
        if clash:
            name = task_name or getattr(task, "name", type(task).__name__)
            raise ConfigError(f"objective {run.cfg.objective.name!r} and task {name!r} both report "
                              f"evaluation metric(s) {clash}")
        if with_objective:
            metrics.update({name: float(np.mean(values)) for name, values in objective_out.items()})
        return {f"{prefix}/{k}": v for k, v in metrics.items()}

    def render(self, state: TrainState, directory: Path, count: int, task: Task) -> list[Path]:
        """The task's pictures of its predictions for the first ``count`` evaluation examples (main host)."""
        if count <= 0 or type(task).render is Task.render:  # a task that draws nothing: no batch to evaluate
            return []
        task_out, _, raw = self.outputs(state, self.run.cfg.dataset.eval_split, task, first_batch_only=True)
        if not self.run.is_main or not raw:
            return []
        count = min(count, len(next(iter(raw.values()))))
        return task.render({k: v[:count] for k, v in raw.items()}, {k: v[:count] for k, v in task_out.items()},
                           directory)


@dataclass(frozen=True)
class Evaluator:
    """One entry of ``evals``: ``task`` (named ``task_name``) on ``split`` every ``every`` steps (and at the end)."""

    name: str
    task: Task
    task_name: str
    split: str
    every: int
    #: the evaluation over another dataset (``evals.NAME.dataset``); None: the run's own dataset
    evaluation: Evaluation | None = None

    def reports_objective(self, evaluators: list[Evaluator]) -> bool:
        """Whether this evaluator reports the objective's evaluation outputs (an online probe): the ``main``
        evaluator, or the first one when there is no ``main`` (once per run, not under every name)."""
        names = [e.name for e in evaluators]
        return self.name == MAIN if MAIN in names else self.name == names[0]

    @property
    def prefix(self) -> str:
        """The metrics' prefix: ``eval`` for the default evaluator, else its name."""
        return "eval" if self.name == MAIN else self.name

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0


def _with_values(section: DictConfig, values: Any, where: str, kind: str) -> DictConfig:
    """``section`` (a plugin's config node) with ``values`` set, each key known and typed, ranges validated."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of {kind} keys to values, got {values!r}")
    for key, value in values.items():
        if key not in section:
            raise ConfigError(f"unknown key {where}.{key}: {kind} {section.name!r} has the keys "
                              f"{', '.join(k for k in section if k != 'name')}")
        try:
            with open_dict(section):
                section[key] = value
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}.{key}={value!r}: {exc.msg}") from None
    validate_node(section, where)
    return section


def _task_section(run: Run, entry: Mapping, where: str) -> DictConfig:
    """The config node of an evaluator's task: the run's own task config when it names the run's task (or
    none), else the task's defaults; ``task_overrides`` applied and validated."""
    name = entry.get("task") or run.cfg.task.name
    if name == run.cfg.task.name:
        section = run.cfg.task.copy()
    else:
        section = OmegaConf.structured(config_node(TASKS.get(name)))
    return _with_values(section, entry.get("task_overrides") or {}, f"{where}.task_overrides", "task")


def _other_dataset(run: Run, values: Any, where: str) -> tuple[DataSource, DictConfig]:
    """The data source of ``evals.NAME.dataset`` (``{name: DATASET, KEY: VALUE, ...}``), whose examples must
    fit the run's model: the same image shape and classes."""
    if not isinstance(values, Mapping) or not values.get("name"):
        raise ConfigError(f"{where}.dataset must be a mapping with a dataset name, e.g. {{name: image_folder, "
                          f"path: DIR}}, got {values!r}")
    values = dict(values)
    section = OmegaConf.structured(config_node(DATASETS.get(values.pop("name"))))
    section = _with_values(section, values, f"{where}.dataset", "dataset")
    source: DataSource = build_plugin(DATASETS, section)
    theirs, ours = source.info, run.info
    if tuple(theirs.image_shape) != tuple(ours.image_shape) or theirs.num_classes != ours.num_classes:
        raise ConfigError(f"{where}.dataset {section.name!r} gives {theirs.num_classes} classes of "
                          f"{'x'.join(map(str, theirs.image_shape))} images; the run's model was built for "
                          f"{ours.num_classes} classes of {'x'.join(map(str, ours.image_shape))} (set the "
                          f"dataset's image_size, or evaluate it with prism eval on a run trained for it)")
    return source, section


def _cadence(run: Run, entry: Mapping, where: str) -> int:
    every, epochs = entry.get("every"), entry.get("every_epochs")
    if every is not None and epochs is not None:
        raise ConfigError(f"{where}: set every (steps) or every_epochs, not both")
    if epochs is not None:
        if not isinstance(epochs, int | float) or epochs <= 0:
            raise ConfigError(f"{where}.every_epochs must be a number > 0, got {epochs!r}")
        return max(1, round(epochs * run.steps_per_epoch))
    if every is None or every == 0:
        return run.eval_every
    if not isinstance(every, int) or every < 0:
        raise ConfigError(f"{where}.every must be a whole number of steps >= 0 (0: train.eval_every), got {every!r}")
    return every


def _evaluator(run: Run, name: str, entry: Any) -> Evaluator:
    where = f"evals.{name}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(EVALUATOR_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(EVALUATOR_KEYS))
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}: an evaluator has the keys {', '.join(EVALUATOR_KEYS)}")
    section = _task_section(run, entry, where)
    evaluation, default_split = None, run.cfg.dataset.eval_split
    if entry.get("dataset") is not None:
        source, data_section = _other_dataset(run, entry["dataset"], where)
        evaluation, default_split = Evaluation(run, source, data_section.train_split), data_section.eval_split
    split = entry.get("split") or default_split
    if not isinstance(split, str):
        raise ConfigError(f"{where}.split must be a split name, got {split!r}")
    try:
        task = run.task if section == run.cfg.task and evaluation is None else run.build_task(section)
        check_on = evaluation.source.split(split) if evaluation is not None else None
        run.check_task(task, section.name, split, check_on)
    except ConfigError as exc:  # the task's own check, named after the plugin's key: say which evaluator
        raise ConfigError(f"{where}: {exc}") from None
    return Evaluator(name, task, section.name, split, _cadence(run, entry, where), evaluation)


def build_evaluators(run: Run) -> list[Evaluator]:
    """The run's evaluators from ``evals`` (None: one, ``main``, the run's task on the evaluation split every
    ``train.eval_every`` steps). Each evaluator's split is opened and its task checked against the model and the
split's examples here, so a wrong entry fails before training."""
    evals = run.cfg.get("evals")
    if evals is None:
        return [Evaluator(MAIN, run.task, run.cfg.task.name, run.cfg.dataset.eval_split, run.eval_every)]
    evals = OmegaConf.to_container(evals, resolve=True) if isinstance(evals, DictConfig) else evals
    if not isinstance(evals, Mapping) or not evals:
        raise ConfigError(f"evals must be a non-empty mapping of evaluator names to settings, got {evals!r}")
    return [_evaluator(run, str(name), entry) for name, entry in evals.items()]


def metric_owner(evaluators: list[Evaluator], metric: str) -> Evaluator | None:
    """The evaluator that reports ``metric`` (``<prefix>/<name>``), None when none does."""
    prefix = metric.split("/", 1)[0]
    return next((e for e in evaluators if e.prefix == prefix), None)


__all__ = ["EVALUATOR_KEYS", "MAIN", "Evaluation", "Evaluator", "build_evaluators", "metric_owner"]
