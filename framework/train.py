"""The Loop: train a :class:`~prism.framework.run.Run` in its run directory, with its evaluators, checkpoint
cadence, preemption, NaN policy and ``result.json``.

Reading order: :class:`Trainer` is a Run plus its training programs
(:class:`~prism.framework.train_programs.TrainPrograms`) and evaluators
(:mod:`prism.framework.evaluators`); :meth:`Trainer.fit` opens the checkpoints, resumes, then repeats
*call -> log -> evaluate the evaluators that are due -> save*, and writes the result record.

Determinism: the data stream is a function of (seed, step) (:mod:`prism.framework.order`), the step's PRNG
key is ``fold_in(seed_key, step)``, and all of it is in the checkpoint, so a resumed run computes
the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from prism.framework.api import Task
from prism.framework.checkpoint import Checkpointer, flatten_nested, signature
from prism.framework.errors import ConfigError, NonFiniteLossError
from prism.framework.evaluators import Evaluation, Evaluator, build_evaluators, metric_owner
from prism.framework.logging import MetricLogger, plot_curves, to_json
from prism.framework.run import RUN_ONCE, Run, System
from prism.framework.rundir import CHECKPOINTS_DIR, PREDICTIONS_DIR, RESULT_FILE, failure_record, write_text_atomic
from prism.framework.steps import STATE_DEFAULTS
from prism.framework.timing import TimeTo, process_seconds
from prism.framework.train_programs import TrainPrograms

#: Config keys (and sections) whose values make a run what it is: a resume with other values is refused.
RUN_DEFINING = ("seed", "precision", "model", "dataset", "objective", "optimizer", "schedule", "augment",
                "train.batch_size", "train.steps", "train.epochs", "train.grad_accum_steps", "train.ema_decay",
                "train.grad_clip_norm", "train.weight_decay_skip_1d")
#: Keys inside those sections that do not change the numbers (where data lives, how a run starts).
NOT_RUN_DEFINING = ("model.pretrained", "dataset.data_dir")


def _dotted(tree: dict) -> dict[str, Any]:
    return {".".join(keys): value for keys, value in flatten_nested(tree).items()}


def _defines_the_run(key: str) -> bool:
    within = lambda names: any(key == n or key.startswith(n + ".") for n in names)  # noqa: E731
    return within(RUN_DEFINING) and not within(NOT_RUN_DEFINING)


class _Preemption:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks, so the run saves and exits
    cleanly; a second Ctrl-C interrupts at once (Python's default handler is back after the first)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.received: str | None = None  # "SIGTERM" or "SIGINT" once one arrived
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Preemption:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is a KeyboardInterrupt
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


@dataclass
class _Progress:
    """Where the loop stands: the step reached, the latest metrics and what the result record reports."""

    step: int
    time_to: TimeTo
    status: str = "completed"
    eval_metrics: dict = field(default_factory=dict)
    last_logged: dict = field(default_factory=dict)
    rates: list = field(default_factory=list)
    first_step_at: float | None = None  # when the first timed training call began (after compiling)
    stopped_at: int | None = None
    interrupted_by: str | None = None


class Trainer(Run):
    """A :class:`~prism.framework.run.Run` that trains in ``run_dir``: its training programs, its evaluators
    and the loop (:meth:`fit`)."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, initialize: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        super().__init__(cfg, initialize=initialize, checkpoints=self.run_dir / CHECKPOINTS_DIR)
        with self.phases("init"):
            self.programs = TrainPrograms(self)
        self.evaluation = Evaluation(self)
        self.evaluators: list[Evaluator] = build_evaluators(self)
        best = cfg.checkpoint.best_metric
        #: the evaluator whose metrics rank checkpoints and drive train.time_to / train.stop_at
        self.ranking = metric_owner(self.evaluators, best) if best else None
        if best and self.ranking is None:
            raise ConfigError(f"checkpoint.best_metric={best!r} names no evaluator's metric (they log "
                              f"{', '.join(e.prefix + '/...' for e in self.evaluators)}); set it to one of those, "
                              f"or checkpoint.best_metric='' to keep only the latest checkpoints")
        ranked_every = self.ranking.every if self.ranking is not None else self.eval_every
        self.save_every = cfg.checkpoint.every or ranked_every
        self.checkpointer: Checkpointer | None = None  # opened by fit(), closed when it returns
        self._skipped_reported = 0  # skipped (non-finite) steps already reported

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, task: Task | None = None, shared: dict | None = None) -> dict[str, float]:
        """``task``'s metrics (default: the run's own) on the evaluation split for the current state, as
        ``eval/<metric>``; see :meth:`~prism.framework.evaluators.Evaluation.metrics`."""
        task_name = self.cfg.task.name if task is None or task is self.task else None
        return self.evaluation.metrics(self.state, task or self.task, shared=shared, task_name=task_name)

    def render(self, directory: Path, count: int, task: Task | None = None) -> list[Path]:
        """The task's pictures of its predictions for the first ``count`` evaluation examples (main host)."""
        return self.evaluation.render(self.state, directory, count, task or self.task)

    def _evaluate_due(self, step: int, last: bool) -> tuple[dict[str, float], bool]:
        """``(metrics of the evaluators due at step, whether the ranking evaluator was among them)``."""
        due = [e for e in self.evaluators if e.due(step, last)]
        shared: dict[int, dict] = {}  # per dataset, while the state is fixed: outputs reused across evaluators
        metrics: dict[str, float] = {}
        for evaluator in due:
            evaluation = evaluator.evaluation or self.evaluation
            metrics.update(evaluation.metrics(self.state, evaluator.task, split_name=evaluator.split,
                                              shared=shared.setdefault(id(evaluation), {}) if len(due) > 1 else None,
                                              prefix=evaluator.prefix, task_name=evaluator.task_name,
                                              with_objective=evaluator.reports_objective(self.evaluators)))
        return metrics, any(e is self.ranking for e in due)

    # -- checkpoints ----------------------------------------------------------------------------
    def _meta(self) -> dict:
        info = self.info
        return {"model": self.cfg.model.name, "signature": signature(self.abstract_state),
                "config": OmegaConf.to_container(self.cfg, resolve=True),
                # the inputs' normalization the model learns with: prism eval/predict apply it to other data too
                "normalization": {"mean": None if info.mean is None else [float(x) for x in info.mean],
                                  "std": None if info.std is None else [float(x) for x in info.std]}}

    def _save(self, step: int, data_iter, metrics: dict | None) -> None:
        if self.checkpointer is None:
            return
        self._check_finite()
        self.checkpointer.save(step, self.state, data_state=data_iter.get_state(), meta=self._meta(),
                               metrics=metrics)

    def _check_finite(self, logger: MetricLogger | None = None) -> None:
        """Stop the run (NonFiniteLossError) once ``train.max_bad_steps`` steps were skipped for a non-finite loss,
        gradient, parameter or statistic; below that, say so once per newly skipped step."""
        count, first = (int(x) for x in jax.device_get((self.state.bad_steps, self.state.bad_step)))
        limit = self.cfg.train.max_bad_steps
        if count == 0:
            return
        if count < limit:
            if logger is not None and count > self._skipped_reported:
                logger.message(f"{count} step(s) skipped so far for NaN/inf values (the first at step {first}); the "
                               f"run stops at train.max_bad_steps={limit}")
            self._skipped_reported = count
            return
        last = self.checkpointer.latest_step() if self.checkpointer else None
        kept = f"the last good checkpoint is step {last} in {self.checkpointer.directory}" if last is not None \
            else "no checkpoint was written"
        which = f"at step {first}; that step's update was" if count == 1 else \
            f"at step {first}; its update and those of {count - 1} later step(s) (train.max_bad_steps={limit}) were"
        raise NonFiniteLossError(
            f"the training loss, gradients or BatchNorm statistics became NaN/inf {which} not applied, {kept}. "
            f"Lower optimizer.lr, enable train.grad_clip_norm, or check the data.")

    def _maybe_resume(self, data_iter) -> int:
        if self.checkpointer is None or not self.cfg.checkpoint.resume:
            return 0
        found = self.checkpointer.restore_latest(self.abstract_state, meta_check={"model": self.cfg.model.name},
                                                 defaults=STATE_DEFAULTS)
        if found is None:
            return 0
        step, self.state, data_state, meta = found
        if not self.cfg.checkpoint.resume_changed:
            self._check_same_run(step, meta.get("config") or {})
        if data_state:
            data_iter.set_state(data_state)
        return step

    def _check_same_run(self, step: int, saved: dict) -> None:
        """A ConfigError naming the settings (``RUN_DEFINING``) whose values differ from those the checkpoint
        at ``step`` was trained with: resuming would silently mix two runs."""
        now = _dotted(OmegaConf.to_container(self.cfg, resolve=True))
        before = _dotted(saved)
        # keys both configs have: a field added to a schema since the checkpoint was written changes nothing
        keys = sorted(k for k in now.keys() & before.keys() if _defines_the_run(k) and now[k] != before[k])
        if keys:
            changes = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in keys[:6])
            more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
            raise ConfigError(f"the checkpoint at step {step} in {self.run_dir / CHECKPOINTS_DIR} was trained with "
                              f"other settings ({changes}{more}); rerun with the same settings, use another "
                              f"hydra.run.dir, or set checkpoint.resume_changed=true to resume anyway")

    def _previous_result(self) -> dict:
        """This run directory's ``result.json`` from an earlier attempt ({} when there is none or it is unreadable)."""
        try:
            return json.loads((self.run_dir / RESULT_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def _preempted_message(self, received: str | None, step: int) -> str:
        if self.checkpointer is None:
            return (f"{received} received: stopped at step {step}; nothing was saved (checkpoint.enabled=false), "
                    f"so the run cannot resume")
        return f"{received} received: saved step {step}; rerun in {self.run_dir} to resume"

    # -- the loop -------------------------------------------------------------------------------
    def _call_length(self, step: int) -> int:
        """Steps of the call that starts after ``step``: up to ``steps_per_call``, ending at the next evaluation
        of any evaluator, checkpoint or the last step (boundaries counted from step 0, so a resumed run makes
        the same calls)."""
        if self.programs.steps_per_call == 1:
            return 1
        after = lambda every: (step // every + 1) * every  # noqa: E731  (the next multiple of ``every``)
        ends = [after(e.every) for e in self.evaluators] + [after(self.save_every), self.micro_steps]
        return min(step + self.programs.steps_per_call, *ends) - step

    def _log_call(self, logger: MetricLogger, logs: dict, first: int, count: int) -> tuple[dict, float] | None:
        """Write the logged steps among ``first+1 .. first+count`` (every ``train.log_every``-th and the last)
        from the call's ``logs``; returns the last one written and the images/s (None when none was due)."""
        due = [s for s in range(first + 1, first + count + 1) if s % self.cfg.train.log_every == 0
               or s == self.micro_steps]
        if not due:
            return None
        fetched = jax.device_get(logs)  # the only sync between calls
        stacked = self.programs.steps_per_call > 1
        rows = [{k: float(v[s - first - 1] if stacked else v) for k, v in fetched.items()} for s in due]
        self._check_finite(logger)
        rate = logger.progress(first + count, loss=rows[-1]["train/loss"], images_per_step=self.cfg.train.batch_size)
        for s, row in zip(due, rows, strict=True):
            logger.write(s, {**row, "train/images_per_s": rate})
        return rows[-1], rate

    def _open_logger(self, start: int) -> MetricLogger:
        cfg = self.cfg
        logger = MetricLogger(self.run_dir, total_steps=self.micro_steps, start_step=start,
                              steps_per_epoch=self.steps_per_epoch, enabled=self.is_main,
                              progress=cfg.logging.progress, tensorboard=cfg.logging.tensorboard)
        for note in self.checkpointer.notes if self.checkpointer is not None else ():
            logger.message(note)
        if start:
            logger.message(f"resumed from the checkpoint at step {start} in {self.checkpointer.directory}")
        elif self.pretrained is not None:
            logger.message(self.pretrained.summary())
        return logger

    def _train_call(self, progress: _Progress, logger: MetricLogger, train_call: Callable[[int], dict]) -> None:
        """Run the next call's steps and log them; the host path's first call compiles and is timed apart."""
        count = self._call_length(progress.step)
        with self.phases("train" if progress.first_step_at is not None else "compile"):
            logs = train_call(count)
            if progress.first_step_at is None:
                jax.block_until_ready(self.state)
                progress.first_step_at = time.perf_counter()
            logged = self._log_call(logger, logs, progress.step, count)
        progress.step += count
        if logged is not None:
            progress.last_logged, rate = logged
            progress.rates.append(rate)

    def _evaluate_step(self, progress: _Progress, logger: MetricLogger, last: bool) -> tuple[bool, bool]:
        """Evaluate the evaluators due now; returns ``(ranked: the ranking evaluator ran, stop: train.stop_at
        was reached)``."""
        cfg, step = self.cfg, progress.step
        if not any(e.due(step, last) for e in self.evaluators):
            return False, False
        with self.phases("eval"):
            metrics, ranked = self._evaluate_due(step, last)
        progress.eval_metrics.update(metrics)
        logger.write(step, metrics)
        target = metrics.get(cfg.checkpoint.best_metric) if ranked else None
        progress.time_to.update(target, step, progress.first_step_at)
        stop_at = cfg.train.stop_at
        if stop_at and target is not None and progress.time_to.reaches(target, stop_at) and not last:
            progress.stopped_at = step
            logger.message(f"{cfg.checkpoint.best_metric}={target:.4f} reached train.stop_at={stop_at} at step "
                           f"{step}: stopping")
            return ranked, True
        return ranked, False

    def _loop(self, progress: _Progress, logger: MetricLogger, data_iter, train_call) -> None:
        with _Preemption() as preemption:
            while progress.step < self.micro_steps:
                self._train_call(progress, logger, train_call)
                step = progress.step
                last = step == self.micro_steps
                ranked, stop = self._evaluate_step(progress, logger, last)
                preempted = self._agreed_preemption(preemption, step)
                if step % self.save_every == 0 or last or stop or preempted:
                    with self.phases("checkpoint"):
                        ranking = dict(progress.eval_metrics) if ranked else None  # a copy: orbax keeps the dict
                        self._save(step, data_iter, ranking)
                if stop:
                    break
                if preempted and not last:
                    received = preemption.received or "SIGTERM/SIGINT (received by another process)"
                    progress.status, progress.interrupted_by = "preempted", received
                    logger.message(self._preempted_message(received, step))
                    break

    def _agreed_preemption(self, preemption: _Preemption, step: int) -> bool:
        """Whether the run stops (and saves) after ``step`` for a signal. One process: its own flag. Several: a
        signal reaches one process, or each at another step, but the save and the steps after are collective,
        so the processes agree, at the same steps on all of them (every call of several steps; on the host
        path every ``train.log_every``-th step and the last), on whether any process was signalled."""
        if jax.process_count() == 1:
            return preemption.requested
        if self.programs.steps_per_call == 1 and step % self.cfg.train.log_every and step != self.micro_steps:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(preemption.requested))
        return bool(np.max(flags))

    def fit(self) -> dict:
        """Train to the configured number of steps; returns (and writes) the run's ``result.json``."""
        cfg = self.cfg
        started = time.perf_counter()
        data_iter, train_call = self.programs.calls()  # timed inside: prepare (and compile on the device path)
        if cfg.checkpoint.enabled:
            self.checkpointer = Checkpointer(self.run_dir / CHECKPOINTS_DIR, cfg.checkpoint)
        progress = _Progress(step=self._maybe_resume(data_iter), time_to=TimeTo(cfg.train.time_to,
                                                                                 cfg.checkpoint.best_mode))
        logger = self._open_logger(progress.step)
        if self.programs.steps_per_call > 1:
            progress.first_step_at = time.perf_counter()  # compiled already
        try:
            if progress.step >= self.micro_steps:  # a finished run: report its final evaluation again
                with self.phases("eval"):
                    progress.eval_metrics, _ = self._evaluate_due(progress.step, last=True)
                progress.last_logged = self._previous_result().get("train_metrics") or {}
            self._loop(progress, logger, data_iter, train_call)
        finally:
            with self.phases("checkpoint"):
                if self.checkpointer is not None:
                    self.checkpointer.close()
            logger.close()
        if progress.status == "completed":
            with self.phases("render"):
                self.render(self.run_dir / PREDICTIONS_DIR, cfg.logging.render)
        result = self._result(progress, started)
        if self.is_main:
            write_text_atomic(self.run_dir / RESULT_FILE, to_json(result, indent=2))
            if cfg.logging.plots:
                plot_curves(self.run_dir)
        return result

    def _result(self, progress: _Progress, started: float) -> dict:
        """The run's record: status, metrics, steps, hardware, and the speed record (see :meth:`_speed_record`)."""
        result = {
            "status": progress.status,
            "metrics": progress.eval_metrics,
            "train_metrics": progress.last_logged,
            "steps": progress.step,
            "total_steps": self.micro_steps,
            "wall_s": round(time.perf_counter() - started, 3),
            "best_step": self.checkpointer.best_step() if self.checkpointer else None,
            "skipped_steps": int(jax.device_get(self.state.bad_steps)),  # not applied: NaN/inf (train.max_bad_steps)
            "params": self.param_count,
            "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        if progress.interrupted_by is not None:  # SIGTERM or SIGINT; resumable only when a checkpoint was written
            result.update(signal=progress.interrupted_by, resumable=self.checkpointer is not None)
        if self.pretrained is not None:
            result["pretrained"] = {"path": self.pretrained.path, "loaded": self.pretrained.loaded,
                                    "head_skipped": self.pretrained.head_skipped}
        result.update(self._speed_record(progress))
        return result

    def _speed_record(self, progress: _Progress) -> dict:
        """``timing`` (seconds per phase), ``process_s``, ``time_to``, ``loop_images_per_s`` (the median
        logged rate, the first log left out when there are others: it holds the compiling step) and
        ``stopped_at`` (the step ``train.stop_at`` ended the run at, else None)."""
        rates = progress.rates
        steady = rates[1:] if len(rates) > 1 else rates
        return {"timing": self.phases.record(self.startup_s), "process_s": round(process_seconds(), 3),
                "time_to": progress.time_to.reached, "stopped_at": progress.stopped_at,
                "loop_images_per_s": round(float(np.median(steady)), 1) if steady else None}


def write_failure(run_dir: Path, error: BaseException, extra: Callable[[], dict] | None = None) -> Path | None:
    """Record a failed run in its ``result.json`` (status, error type and message); over a finished run, in a
    new ``attempts/`` entry instead (:func:`prism.framework.rundir.failure_record`). Returns the file written."""
    if jax.process_index() != 0:
        return None
    result = {"status": "failed", "error": f"{type(error).__name__}: {error}", **(extra() if extra else {})}
    path = failure_record(run_dir)
    write_text_atomic(path, to_json(result, indent=2))
    return path


__all__ = ["CHECKPOINTS_DIR", "PREDICTIONS_DIR", "RESULT_FILE", "RUN_DEFINING", "RUN_ONCE", "System", "Trainer",
           "write_failure"]
