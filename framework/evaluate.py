"""Offline evaluation of a saved run: ``prism eval checkpoint=RUN_DIR [task=...|eval.tasks=[...]] [key=value ...]``.

A run's checkpoints hold, beside the train state, the exact config that built it. :func:`load_run` rebuilds
that config (typed, through the same Hydra schema as ``prism train``), applies the caller's overrides (a
different task: ``task=knn``; another dataset or split; evaluation batch size), builds the
:class:`~prism.framework.run.Run` (no training programs, no run directory) and restores the chosen checkpoint
into it. :func:`evaluate_run` then evaluates (:class:`~prism.framework.evaluators.Evaluation`) and writes
``RUN_DIR/eval/<task>-<step>-<time>/result.json`` (``"mode": "offline"``, the step, the overrides, the task's
settings) plus the task's pictures of its predictions.

:func:`evaluate_tasks` evaluates several tasks in one process (``eval.tasks=[linear_probe,knn]``): the run is
rebuilt, its dataset opened and its checkpoint restored once, and tasks with the same
:meth:`~prism.framework.api.Task.eval_outputs_key` (kNN and the linear probe: the frozen backbone's features) share
one computation of their outputs per split. Each task writes its own result, in ``<out>/<task>/`` (default
``RUN_DIR/eval/<task>-<step>-<time>/``), as the equivalent single-task call would (its ``overrides`` are
that call's). A ``task.KEY=VALUE`` override applies to each listed task whose config has ``KEY``.

``step`` is ``best`` (the best checkpoint by the run's ``checkpoint.best_metric``; the latest when it has
none), ``latest``, a step number, or ``init``: the run's architecture and config with freshly initialized
weights, the honest baseline for "what does training buy".
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from prism.framework.checkpoint import Checkpointer
from prism.framework.config import SELECTED_KINDS, CheckpointConfig, compose
from prism.framework.errors import CheckpointError, ConfigError, UnknownNameError
from prism.framework.evaluators import Evaluation
from prism.framework.logging import to_json
from prism.framework.registry import TASKS
from prism.framework.run import Run
from prism.framework.rundir import CHECKPOINTS_DIR, PREDICTIONS_DIR, RESULT_FILE
from prism.framework.steps import STATE_DEFAULTS

#: The composed config Hydra writes into every run directory (used by ``eval.step=init`` without checkpoints).
HYDRA_CONFIG = Path(".hydra") / "config.yaml"


def _has_checkpoints(run_dir: Path) -> bool:
    directory = run_dir / CHECKPOINTS_DIR
    return directory.is_dir() and any(directory.iterdir())


def _checkpointer(run_dir: Path, cfg: CheckpointConfig | None = None) -> Checkpointer:
    directory = run_dir / CHECKPOINTS_DIR
    if not _has_checkpoints(run_dir):
        raise CheckpointError(f"no checkpoints in {directory}: is {run_dir} the directory of a prism run that "
                              f"saved one (checkpoint.enabled=true)?")
    return Checkpointer(directory, cfg or CheckpointConfig(), read_only=True)


def _parse(overrides: Sequence[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """``(group choices, [(key, value), ...])`` from Hydra-syntax overrides (typed values)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse the overrides {list(overrides)}: {exc}") from exc
    groups, values = {}, []
    for o in parsed:
        if o.is_delete() or o.is_add() or o.is_force_add() or o.is_sweep_override():
            raise ConfigError(f"override '{o.input_line}': prism eval takes plain key=value overrides (no +, ~, "
                              f"++ or sweeps)")
        if o.key_or_group in SELECTED_KINDS:
            groups[o.key_or_group] = o.value()
        else:
            values.append((o.key_or_group, o.value()))
    return groups, values


def _compose_saved(saved: dict, groups: dict[str, str]) -> DictConfig:
    """The typed config of the saved run with the plugin choices ``groups`` changed."""
    choices = {kind: saved[kind]["name"] for kind in SELECTED_KINDS if kind in saved}
    choices.update(groups)
    cfg = compose([f"{kind}={name}" for kind, name in choices.items()])
    kept = {k: v for k, v in saved.items() if k not in groups}
    try:
        cfg = OmegaConf.merge(cfg, kept)
    except Exception as exc:  # the plugin's config changed since the run was saved
        raise ConfigError(f"the run's saved config no longer fits the current schema: {exc}") from exc
    return cfg


def _no_checkpoints(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):  # evaluation never trains, and must never touch the run's checkpoints
        cfg.checkpoint.enabled = False
    return cfg


def _has_key(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.select(cfg, key, default="__missing__") != "__missing__"


def _apply(cfg: DictConfig, values: Sequence[tuple[str, Any]]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides applied (type-checked; an unknown key is an error)."""
    for key, value in values:
        if not _has_key(cfg, key):
            raise ConfigError(f"unknown config key {key!r} in override '{key}={value}'")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:  # wrong type or value: say which override
            raise ConfigError(f"override '{key}={value}': {str(exc).splitlines()[0]}") from exc
    return cfg


def run_config(saved: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The typed config of a run from its saved (resolved) config plus ``overrides``."""
    groups, values = _parse(overrides)
    return _no_checkpoints(_apply(_compose_saved(saved, groups), values))


def parse_task_list(text: str) -> list[str]:
    """The task names of ``eval.tasks=TEXT``: a Hydra list ``[linear_probe,knn]`` or one name."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        override = OverridesParser.create().parse_override(f"eval.tasks={text}")
    except HydraException as exc:
        raise ConfigError(f"eval.tasks={text}: not a list of task names ({exc}); e.g. eval.tasks=[linear_probe,knn]"
                          ) from None
    if override.is_sweep_override():
        raise ConfigError(f"eval.tasks={text}: give the tasks as a list in brackets, eval.tasks=[{text}] (a,b is "
                          f"Hydra's sweep syntax)")
    value = override.value()
    return list(value) if isinstance(value, list) else [value]


def _task_names(tasks: Sequence[str]) -> list[str]:
    """``tasks`` checked: a non-empty list of distinct registered task names (or ``conf/task`` presets)."""
    from prism.framework.config import group_options

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    shown = f"eval.tasks=[{','.join(map(str, names))}]"
    if not names:
        raise ConfigError("eval.tasks is empty: name one task or more, e.g. eval.tasks=[linear_probe,knn]")
    options = group_options("task")
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{shown}: entry {name!r} is not a task name")
        if name not in options:
            try:
                TASKS.get(name)  # the registry's error: close matches, every name, failed plugin modules
            except UnknownNameError as exc:
                raise UnknownNameError(f"{shown}: {exc}") from None
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{shown} names {', '.join(twice)} more than once")
    return names


class _Plan(NamedTuple):
    """One task's evaluation: its config, the overrides of the equivalent single-task call, its output folder."""

    cfg: DictConfig
    overrides: list[str]
    out_dir: Path


def _task_plans(saved: dict, overrides: Sequence[str], names: list[str], out_dirs: list[Path]) -> list[_Plan]:
    """Per task: the common overrides plus ``task=NAME`` plus the ``task.KEY=VALUE`` overrides its config has."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups, values = _parse(overrides)
    if "task" in groups:
        raise ConfigError(f"task={groups['task']} and eval.tasks=[...] together: name the tasks in eval.tasks only")
    lines = {o.key_or_group: o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))}
    common = [line for key, line in lines.items() if not key.startswith("task.")]
    task_values = [(k, v) for k, v in values if k.startswith("task.")]
    other_values = [(k, v) for k, v in values if not k.startswith("task.")]
    plans, used = [], set()
    for name, out_dir in zip(names, out_dirs, strict=True):
        cfg = _apply(_compose_saved(saved, {**groups, "task": name}), other_values)
        mine = [(k, v) for k, v in task_values if _has_key(cfg, k)]
        used.update(k for k, _ in mine)
        equivalent = [*common, f"task={name}", *(lines[k] for k, _ in mine)]
        plans.append(_Plan(_no_checkpoints(_apply(cfg, mine)), equivalent, out_dir))
    unused = [lines[k] for k, _ in task_values if k not in used]
    if unused:
        raise ConfigError(f"override '{unused[0]}': none of the tasks {', '.join(names)} has the key "
                          f"{unused[0].split('=', 1)[0]!r}")
    return plans


def _choose_step(checkpointer: Checkpointer, step: str | int) -> int:
    available = checkpointer.all_steps()
    if step == "latest" or (step == "best" and checkpointer.best_step() is None):
        return max(available)
    if step == "best":
        return checkpointer.best_step()
    try:
        number = int(step)
    except ValueError:
        raise ConfigError(f"eval.step must be best, latest, init or a step number, got {step!r}") from None
    if number not in available:
        raise CheckpointError(f"no checkpoint at step {number} in {checkpointer.directory}; saved steps: "
                              f"{sorted(available)}")
    return number


def saved_config(run_dir: str | Path, step: str | int | None = None) -> dict:
    """The resolved config the run in ``run_dir`` saved with its (latest) checkpoint. For ``step="init"``
    (fresh weights need only the config) a run without checkpoints serves Hydra's ``.hydra/config.yaml``."""
    run_dir = Path(run_dir)
    hydra_config = run_dir / HYDRA_CONFIG
    if step == "init" and not _has_checkpoints(run_dir):
        if not hydra_config.is_file():
            raise CheckpointError(f"eval.step=init needs the run's config: {run_dir} has neither checkpoints nor "
                                  f"{HYDRA_CONFIG}")
        return OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=True)
    probe = _checkpointer(run_dir)
    try:
        saved = probe.read_meta(max(probe.all_steps())).get("config")
    finally:
        probe.close()
    if not saved:
        raise CheckpointError(f"the checkpoints in {run_dir / CHECKPOINTS_DIR} carry no config (written by an "
                              f"older prism?); cannot rebuild the run")
    return saved


def restore(run: Run, run_dir: str | Path, saved: dict, step: str | int = "best") -> int | None:
    """Restore the run's checkpoint at ``step`` into ``run`` (``init``: keep its fresh weights); returns the
    step restored (None for ``init``). Inputs are then normalized as the model was trained: with the statistics
    the checkpoint records, not those of a dataset given in the overrides (digits, say, computes them on its
    training split, so another split of it would shift every input)."""
    if step == "init":
        return None
    checkpointer = _checkpointer(Path(run_dir), CheckpointConfig(**saved.get("checkpoint", {})))
    try:
        restored = _choose_step(checkpointer, step)
        run.state, _, meta = checkpointer.restore(restored, run.abstract_state,
                                                  meta_check={"model": run.cfg.model.name}, defaults=STATE_DEFAULTS)
    finally:
        checkpointer.close()
    normalization = meta.get("normalization")
    if normalization:  # checkpoints written before it was recorded keep the dataset's own
        run.info = dataclasses.replace(run.info, mean=normalization["mean"], std=normalization["std"])
    return restored


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), step: str | int = "best") -> tuple[Run, int | None]:
    """The :class:`~prism.framework.run.Run` of the run in ``run_dir`` with its checkpoint at ``step`` restored
    (``init``: freshly initialized), its config changed by ``overrides``; returns ``(run, step restored)``."""
    run_dir = Path(run_dir)
    saved = saved_config(run_dir, step)
    run = Run(run_config(saved, overrides), initialize=step == "init")
    return run, restore(run, run_dir, saved, step)


def _existing_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint={run_dir}: no such run directory")
    return run_dir


def _label(task: str, step: str | int, stamp: str) -> str:
    return "-".join(filter(None, (task or "eval", str(step), stamp)))


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = (), step: str | int = "best",
                 out_dir: str | Path | None = None) -> dict:
    """Evaluate a saved run (see the module docstring); returns and writes the result record."""
    started = time.perf_counter()
    run_dir = _existing_run_dir(run_dir)
    saved = saved_config(run_dir, step)
    if out_dir is None:
        out_dir = run_dir / "eval" / _label(_parse(overrides)[0].get("task", ""), step, time.strftime("%Y%m%d-%H%M%S"))
    plan = _Plan(run_config(saved, overrides), list(overrides), Path(out_dir))
    return _evaluate(run_dir, saved, [plan], step, started)[0]


def evaluate_tasks(run_dir: str | Path, tasks: Sequence[str], overrides: Sequence[str] = (),
                   step: str | int = "best", out_dir: str | Path | None = None) -> list[dict]:
    """Evaluate a saved run on several ``tasks`` in one process (see the module docstring); returns the result
    records, in the order of ``tasks``, each also written to ``<out_dir>/<task>/`` (default
    ``RUN_DIR/eval/<task>-<step>-<time>/``)."""
    started = time.perf_counter()
    run_dir = _existing_run_dir(run_dir)
    names = _task_names(tasks)
    saved = saved_config(run_dir, step)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = Path(out_dir) if out_dir is not None else run_dir / "eval"
    out_dirs = [root / name if out_dir is not None else root / _label(name, step, stamp) for name in names]
    plans = _task_plans(saved, overrides, names, out_dirs)
    return _evaluate(run_dir, saved, plans, step, started)


def _evaluate(run_dir: Path, saved: dict, plans: list[_Plan], step: str | int, started: float) -> list[dict]:
    """Build the run once (with the first plan's config), build every plan's task, restore the checkpoint once,
    then evaluate and write each task. A result's ``wall_s`` is what its task added to the process: the first
    one also pays building and restoring the run, and outputs that later tasks reuse."""
    run = Run(plans[0].cfg, initialize=step == "init")  # else the checkpoint gives the weights
    evaluation = Evaluation(run)
    tasks = [run.task, *(run.build_task(plan.cfg.task) for plan in plans[1:])]
    for plan, task in zip(plans[1:], tasks[1:], strict=True):
        run.check_task(task, plan.cfg.task.name, plan.cfg.dataset.eval_split)
    restored = restore(run, run_dir, saved, step)
    shared = {} if len(plans) > 1 else None  # outputs by (split, eval_outputs_key), while the state is fixed
    results, mark = [], started
    for plan, task in zip(plans, tasks, strict=True):
        metrics = evaluation.metrics(run.state, task, shared=shared, task_name=plan.cfg.task.name)
        renders = evaluation.render(run.state, plan.out_dir / PREDICTIONS_DIR, plan.cfg.logging.render, task)
        now = time.perf_counter()
        result = {
            "mode": "offline",
            "task": plan.cfg.task.name,
            "task_settings": task.describe(),
            "dataset": plan.cfg.dataset.name,
            "eval_split": plan.cfg.dataset.eval_split,
            "checkpoint": str(run_dir.absolute()),
            "step": restored if restored is not None else "init",
            "overrides": plan.overrides,
            "metrics": metrics,
            "predictions": [str(p) for p in renders],
            "wall_s": round(now - mark, 3),
            "devices": jax.device_count(),
        }
        if len(plans) > 1:
            result["evaluated_with"] = [p.cfg.task.name for p in plans]
        mark = now
        if run.is_main:
            plan.out_dir.mkdir(parents=True, exist_ok=True)
            (plan.out_dir / RESULT_FILE).write_text(to_json(result, indent=2))
            (plan.out_dir / "config.yaml").write_text(OmegaConf.to_yaml(plan.cfg))
        result["out_dir"] = str(plan.out_dir)
        results.append(result)
    return results
