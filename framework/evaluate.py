"""Offline evaluation of a saved run: ``prism eval checkpoint=RUN_DIR [task=...] [dataset=...] [key=value ...]``.

A run's checkpoints hold, beside the train state, the exact config that built it. :func:`load_run` rebuilds
that config (typed, through the same Hydra schema as ``prism train``), applies the caller's overrides (a
different task: ``task=knn``; another dataset or split; evaluation batch size), builds the :class:`Trainer`
and restores the chosen checkpoint into it. :func:`evaluate_run` then evaluates and writes
``RUN_DIR/eval/<task>-<step>-<time>/result.json`` (``"mode": "offline"``, the step, the overrides, the task's
settings) plus the task's pictures of its predictions.

``step`` is ``best`` (the best checkpoint by the run's ``checkpoint.best_metric``; the latest when it has
none), ``latest``, a step number, or ``init``: the run's architecture and config with freshly initialized
weights, the honest baseline for "what does training buy".
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from framework.checkpoint import Checkpointer
from framework.config import SELECTED_KINDS, CheckpointConfig, compose
from framework.errors import CheckpointError, ConfigError
from framework.train import PREDICTIONS_DIR, RESULT_FILE, Trainer

CHECKPOINTS_DIR = "checkpoints"
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


def run_config(saved: dict, overrides: Sequence[str] = ()) -> DictConfig:
    """The typed config of a run from its saved (resolved) config plus ``overrides``."""
    groups, values = _parse(overrides)
    choices = {kind: saved[kind]["name"] for kind in SELECTED_KINDS if kind in saved}
    choices.update(groups)
    cfg = compose([f"{kind}={name}" for kind, name in choices.items()])
    kept = {k: v for k, v in saved.items() if k not in groups}
    try:
        cfg = OmegaConf.merge(cfg, kept)
    except Exception as exc:  # the plugin's config changed since the run was saved
        raise ConfigError(f"the run's saved config no longer fits the current schema: {exc}") from exc
    for key, value in values:
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown config key {key!r} in override '{key}={value}'")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:  # wrong type or value: say which override
            raise ConfigError(f"override '{key}={value}': {str(exc).splitlines()[0]}") from exc
    with open_dict(cfg):  # evaluation never trains, and must never touch the run's checkpoints
        cfg.checkpoint.enabled = False
    return cfg


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


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), step: str | int = "best",
             out_dir: str | Path | None = None) -> tuple[Trainer, int | None]:
    """A :class:`Trainer` for the run in ``run_dir`` with its checkpoint at ``step`` restored (``init``:
    freshly initialized), its config changed by ``overrides``; returns ``(trainer, step restored)``."""
    run_dir = Path(run_dir)
    hydra_config = run_dir / HYDRA_CONFIG
    if step == "init" and not _has_checkpoints(run_dir) and hydra_config.is_file():
        # fresh weights need only the run's config: Hydra's copy serves when the checkpoints are gone
        saved = OmegaConf.to_container(OmegaConf.load(hydra_config), resolve=True)
        return Trainer(run_config(saved, overrides), out_dir or run_dir / "eval"), None
    probe = _checkpointer(run_dir)
    saved = probe.read_meta(max(probe.all_steps())).get("config")
    probe.close()
    if not saved:
        raise CheckpointError(f"the checkpoints in {run_dir / CHECKPOINTS_DIR} carry no config (written by an "
                              f"older prism?); cannot rebuild the run")
    cfg = run_config(saved, overrides)
    checkpointer = _checkpointer(run_dir, CheckpointConfig(**saved.get("checkpoint", {})))
    trainer = Trainer(cfg, out_dir or run_dir / "eval")
    restored = None
    try:
        if step != "init":
            restored = _choose_step(checkpointer, step)
            trainer.state, _, _ = checkpointer.restore(restored, trainer.abstract_state,
                                                       meta_check={"model": cfg.model.name})
    finally:
        checkpointer.close()
    return trainer, restored


def evaluate_run(run_dir: str | Path, overrides: Sequence[str] = (), step: str | int = "best",
                 out_dir: str | Path | None = None) -> dict:
    """Evaluate a saved run (see the module docstring); returns and writes the result record."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint={run_dir}: no such run directory")
    if out_dir is None:
        task = _parse(overrides)[0].get("task", "")
        label = "-".join(filter(None, (task or "eval", str(step), time.strftime("%Y%m%d-%H%M%S"))))
        out_dir = run_dir / "eval" / label
    out_dir = Path(out_dir)
    trainer, restored = load_run(run_dir, overrides, step, out_dir)
    metrics = trainer.evaluate()
    renders = trainer.render(out_dir / PREDICTIONS_DIR, trainer.cfg.logging.render)
    result = {
        "mode": "offline",
        "task": trainer.cfg.task.name,
        "task_settings": trainer.task.describe(),
        "dataset": trainer.cfg.dataset.name,
        "eval_split": trainer.cfg.dataset.get("eval_split", "test"),
        "checkpoint": str(run_dir.absolute()),
        "step": restored if restored is not None else "init",
        "overrides": list(overrides),
        "metrics": metrics,
        "predictions": [str(p) for p in renders],
        "wall_s": round(time.perf_counter() - started, 3),
        "devices": jax.device_count(),
    }
    if trainer.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(trainer.cfg))
    result["out_dir"] = str(out_dir)
    return result
