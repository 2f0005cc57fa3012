"""prism's Hydra launcher (``hydra/launcher=prism``, the default for ``prism train -m``): no job takes the
sweep down with it.

Hydra's basic and joblib launchers abort a whole sweep when one job fails outside the task function: a job
directory that cannot be created (a file of that name is in the way, no permission), or a joblib worker
process that is killed (loky raises for the whole ``Parallel`` call) — the healthy jobs after it never start.
This launcher runs every job and records each failure in the sweep itself:

- ``processes=false`` (default): the jobs run one after another in this process, as Hydra's basic launcher
  runs them; an exception escaping a job is that job's failure.
- ``processes=true``: each job runs in a fresh Python process (:mod:`.worker`), ``n_jobs`` at a time, as
  joblib's would (per-job GPU sets through ``parallel.devices_per_job`` work the same); a process that dies —
  killed, out of memory, a crash in native code — fails its job alone.

A failed job's record is its ``result.json`` (status ``failed`` and the reason) when its directory is usable,
else ``.prism_jobs/<num>.json`` in the sweep directory; the launcher also writes there, for every job it
starts, the job's number, overrides and directory, so :func:`prism.framework.sweep.sweep_jobs` lists every job
of the sweep, those that never got a directory included. A failed job returns ``None`` to the sweeper, as a
job whose run failed does (the basic sweeper goes on, Optuna marks the trial failed).

Installed as ``hydra_plugins.prism_launcher`` (pyproject ``package-dir``): Hydra instantiates launchers only
from its ``hydra_plugins`` namespace.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from prism.framework.sweep import LAUNCHER_RECORDS, RESULT_FILE

log = logging.getLogger(__name__)


@dataclass
class PrismLauncherConf:
    _target_: str = "hydra_plugins.prism_launcher.PrismLauncher"
    #: Run each job in a fresh Python process (a dying process fails its job only).
    processes: bool = False
    #: Jobs at once when ``processes`` is true (each in its own process).
    n_jobs: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="prism", node=PrismLauncherConf, provider="prism")


def job_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], num: int) -> DictConfig:
    """The composed config of job ``num`` of the sweep, as Hydra's launchers build it."""
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
    return sweep_config


def run_one(hydra_context: HydraContext, sweep_config: DictConfig, task_function: TaskFunction) -> JobReturn:
    """Run one job through Hydra's ``run_job`` (job directory, ``.hydra/`` files, logging, callbacks)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(sweep_config)
    return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def job_dir(sweep_config: DictConfig) -> Path:
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def write_json(path: Path, record: dict) -> None:
    """Write ``record`` whole or not at all (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


class SweepRecord:
    """The sweep directory's ``.prism_jobs/<num>.json`` records, and failures written where they belong."""

    def __init__(self, sweep_dir: Path):
        self.dir = sweep_dir / LAUNCHER_RECORDS
        self.dir.mkdir(parents=True, exist_ok=True)

    def started(self, num: int, overrides: Sequence[str], directory: Path) -> None:
        write_json(self.dir / f"{num}.json", {"num": num, "overrides": list(overrides), "dir": str(directory)})

    def failed(self, num: int, overrides: Sequence[str], directory: Path, error: str) -> None:
        """Record job ``num``'s failure: in its ``result.json`` when the job wrote none and its directory takes
        one, else (never over the job's own record) in ``.prism_jobs/<num>.json``."""
        log.error("job %d failed: %s", num, error)
        record = {"status": "failed", "error": error}
        if directory.is_dir() and not (directory / RESULT_FILE).exists():
            try:
                write_json(directory / RESULT_FILE, record)
                return
            except OSError:
                pass
        write_json(self.dir / f"{num}.json", {"num": num, "overrides": list(overrides), "dir": str(directory),
                                              **record})


def failed_return(overrides: Sequence[str], sweep_config: DictConfig) -> JobReturn:
    """What a sweeper gets for a job that failed outside its task: ``None``, as for a failed run."""
    ret = JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=sweep_config,
                    working_dir=str(job_dir(sweep_config)), task_name=str(sweep_config.hydra.job.name),
                    status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"the job's process was killed by {name}"
    return f"the job's process exited with status {returncode} before reporting"


class PrismLauncher(Launcher):
    """Hydra launcher running every job of a sweep whatever happens to the others (module docstring)."""

    def __init__(self, processes: bool = False, n_jobs: int = 1) -> None:
        super().__init__()
        if int(n_jobs) < 1:
            from prism.framework.errors import ConfigError

            raise ConfigError(f"hydra.launcher.n_jobs must be >= 1, got {n_jobs}")
        self.processes = bool(processes)
        self.n_jobs = int(n_jobs)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        record = SweepRecord(sweep_dir)
        mode = f"{self.n_jobs} process(es) at a time" if self.processes else "one after another in this process"
        log.info("Launching %d jobs, %s", len(job_overrides), mode)
        jobs = []
        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
            sweep_config = job_config(self.hydra_context, self.config, overrides, num)
            record.started(num, overrides, job_dir(sweep_config))
            jobs.append((num, list(overrides), sweep_config))
        if not self.processes:
            return [self._in_process(record, *job) for job in jobs]
        with ThreadPoolExecutor(max_workers=self.n_jobs) as pool:
            return list(pool.map(lambda job: self._in_subprocess(record, *job), jobs))

    def _in_process(self, record: SweepRecord, num: int, overrides: list[str], sweep_config: DictConfig) -> JobReturn:
        assert self.hydra_context is not None and self.task_function is not None and self.config is not None
        try:
            ret = run_one(self.hydra_context, sweep_config, self.task_function)
        except Exception as exc:  # outside the task (its own errors it records and returns None)
            record.failed(num, overrides, job_dir(sweep_config), f"{type(exc).__name__}: {exc}")
            ret = failed_return(overrides, sweep_config)
        finally:
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        if ret.status == JobStatus.FAILED:  # an exception the task let through: this job's failure alone
            record.failed(num, overrides, job_dir(sweep_config), f"{type(ret._return_value).__name__}: "
                                                                   f"{ret._return_value}")
            ret = failed_return(overrides, sweep_config)
        return ret

    def _in_subprocess(self, record: SweepRecord, num: int, overrides: list[str],
                       sweep_config: DictConfig) -> JobReturn:
        assert self.hydra_context is not None and self.task_function is not None
        try:  # a directory that cannot be made fails here, without a process started for nothing
            job_dir(sweep_config).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            record.failed(num, overrides, job_dir(sweep_config), f"{type(exc).__name__}: {exc}")
            return failed_return(overrides, sweep_config)
        work = Path(tempfile.mkdtemp(prefix=f"job{num}_", dir=record.dir))
        payload, answer = work / "job.pkl", work / "return.pkl"
        payload.write_bytes(cloudpickle.dumps((self.hydra_context, sweep_config, self.task_function,
                                               Singleton.get_state())))
        proc = subprocess.run([sys.executable, "-m", "hydra_plugins.prism_launcher.worker", str(payload),
                               str(answer)], check=False)
        try:
            ret = cloudpickle.loads(answer.read_bytes()) if proc.returncode == 0 and answer.exists() else None
        finally:
            for path in (payload, answer):
                path.unlink(missing_ok=True)
            work.rmdir()
        if isinstance(ret, JobReturn) and ret.status != JobStatus.FAILED:
            return ret
        error = ret._return_value if isinstance(ret, JobReturn) else None
        reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else exit_reason(
            proc.returncode)
        record.failed(num, overrides, job_dir(sweep_config), reason)
        return failed_return(overrides, sweep_config)


def register() -> None:
    """Make the launcher known to Hydra also where its plugin scan misses this module (some editable installs)."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(PrismLauncher)


__all__ = ["PrismLauncher", "PrismLauncherConf", "register"]
