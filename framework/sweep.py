"""Sweeps: the jobs of a multirun directory, and what the ``prism train -m`` process learns about them.

Hydra's launchers (basic, joblib, submitit, Ray) run the jobs; some run them in other processes or on
other machines, so the only record every launcher shares is the sweep directory. Each job writes its
``.hydra/overrides.yaml`` when it starts and its ``result.json`` (status ``completed``, ``preempted`` or
``failed`` with the error) when it ends. :class:`SweepTracker`, a Hydra callback in the main process,
remembers the sweep directory and which job directories already existed; after the launcher returns,
:func:`unfinished_jobs` reads the jobs of this sweep and reports those that did not complete, whatever
launcher ran them.

:func:`claim_devices` gives each concurrent job process (joblib) its own set of accelerators.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from prism.framework.errors import ConfigError

log = logging.getLogger("prism")

RESULT_FILE = "result.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
#: Where ``hydra/launcher=prism`` records each job it launches (``<num>.json``: overrides, directory, and the
#: failure when the job could not record it itself) — the jobs that never got a directory included.
LAUNCHER_RECORDS = ".prism_jobs"


@dataclass
class Job:
    """One job of a sweep, as its directory records it."""

    dir: Path
    name: str  # path relative to the sweep directory ("0", "1", ...)
    overrides: dict[str, str]  # key -> value as typed on the command line (``+``/``~`` prefixes kept on keys)
    result: dict[str, Any] = field(default_factory=dict)  # result.json ({} when the job wrote none)
    stamp_file: Path | None = None  # the file whose mtime tells this start of the job from an earlier one

    @property
    def status(self) -> str:
        return self.result.get("status", "no result.json")

    @property
    def error(self) -> str:
        if not self.result:
            return "the job wrote no result.json (killed, or still running: see the launcher's logs)"
        return self.result.get("error", "")


def _job_sort_key(path: Path) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.parts]


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every job directory under ``sweep_dir`` (one holding ``.hydra/overrides.yaml``), in job order."""
    root = Path(sweep_dir)
    found = [p.parent.parent for p in root.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    return sorted((d for d in found if d != root), key=lambda d: _job_sort_key(d.relative_to(root)))


def parse_overrides(lines: list[str]) -> dict[str, str]:
    """``["optimizer.lr=0.001", "model=vgg11"]`` -> ``{"optimizer.lr": "0.001", "model": "vgg11"}``."""
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key] = value
    return out


def read_job(job_dir: Path, sweep_dir: Path) -> Job:
    overrides = yaml.safe_load((job_dir / OVERRIDES_FILE).read_text()) or []
    result_path = job_dir / RESULT_FILE
    result = {}
    if result_path.exists():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError as exc:  # a job killed while writing it
            result = {"status": "failed", "error": f"unreadable result.json: {exc}"}
    return Job(job_dir, str(job_dir.relative_to(sweep_dir)), parse_overrides(overrides), result)


def launcher_record_jobs(root: Path, known: set[Path]) -> list[Job]:
    """Jobs that ``hydra/launcher=prism`` launched but that have no job directory of their own in ``known``
    (a file was in its way, or it never started), from its ``.prism_jobs/`` records."""
    jobs = []
    for path in sorted((root / LAUNCHER_RECORDS).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            job_dir = Path(record["dir"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if job_dir in known:
            continue
        result = ({"status": record["status"], "error": record.get("error", "")} if "status" in record else
                  {"status": "not started", "error": f"the job has no directory with a .hydra/ record ({job_dir})"})
        name = str(job_dir.relative_to(root)) if job_dir.is_relative_to(root) else str(job_dir)
        jobs.append(Job(job_dir, name, parse_overrides(record.get("overrides", [])), result, stamp_file=path))
    return jobs


def read_jobs(sweep_dir: str | Path) -> list[Job]:
    """The jobs of a multirun directory, in job order: those with a job directory, and those that
    ``hydra/launcher=prism`` recorded as failed before they had one."""
    root = Path(sweep_dir)
    jobs = [read_job(d, root) for d in job_dirs(root)]
    jobs += launcher_record_jobs(root, {j.dir for j in jobs})
    return sorted(jobs, key=lambda j: _job_sort_key(Path(j.name)))


def _stamp(job: Job) -> int:
    return (job.stamp_file or job.dir / OVERRIDES_FILE).stat().st_mtime_ns


class SweepTracker(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): notes the sweep directory in the process
    that runs ``prism train -m``, and which job directories were already there (a reused ``hydra.sweep.dir``).

    Uses no clocks, so it holds on shared file systems whose clocks differ from this machine's.
    """

    #: The sweep started by this process: (sweep dir, {existing job dir: overrides.yaml mtime}), else None.
    current: tuple[Path, dict[Path, int]] | None = None

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        before = {j.dir: _stamp(j) for j in read_jobs(sweep_dir)} if sweep_dir.is_dir() else {}
        SweepTracker.current = (sweep_dir, before)


def sweep_jobs(sweep_dir: Path, before: dict[Path, int] | None = None) -> list[Job]:
    """The jobs of this sweep: those whose directory is new or was started again since ``before``."""
    before = before or {}
    return [j for j in read_jobs(sweep_dir) if before.get(j.dir) != _stamp(j)]


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, in order of first appearance."""
    keys: list[str] = []
    for job in jobs:
        keys += [k for k in job.overrides if k not in keys]
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def failure_summary(sweep_dir: Path, jobs: list[Job]) -> str | None:
    """A summary of the jobs that did not complete (None when all did)."""
    unfinished = [j for j in jobs if j.status != "completed"]
    if not unfinished:
        return None
    keys = swept_keys(jobs) or list(unfinished[0].overrides)
    lines = [f"{len(unfinished)} of {len(jobs)} sweep job(s) did not complete (sweep directory {sweep_dir}):"]
    for job in unfinished:
        values = " ".join(f"{k}={job.overrides.get(k, '')}" for k in keys)
        lines.append(f"  {job.name} [{job.status}] {values}")
        if job.error:
            lines.append(f"      {job.error}")
    lines.append(f"`prism sweep-report {sweep_dir}` tabulates every job.")
    return "\n".join(lines)


# -- devices for concurrent jobs -------------------------------------------------------------------
_claimed: tuple[Any, str] | None = None  # (open lock file, the device list it holds) for this process


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES entries: the variable itself when set, else nvidia-smi's."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                         text=True, check=False)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def claim_devices(per_job: int, lock_dir: Path) -> str | None:
    """Give this process its own ``per_job`` GPUs by setting ``CUDA_VISIBLE_DEVICES``; returns them.

    For launchers that run several jobs at once on one machine (joblib): the GPUs are cut into sets of
    ``per_job``; each job process locks the first free set (``fcntl`` locks on files in ``lock_dir``, held
    for the life of the process, so a worker reused for later jobs keeps its set, and a worker that dies
    frees it). Must run before JAX initializes its backends. Returns None when there are no GPUs.
    """
    global _claimed
    if _claimed is not None:
        return _claimed[1]
    gpus = visible_gpus()
    if not gpus:
        log.warning("parallel.devices_per_job=%d: no GPUs visible, jobs share the host's devices", per_job)
        return None
    sets = [gpus[i:i + per_job] for i in range(0, len(gpus) - per_job + 1, per_job)]
    if not sets:
        raise ConfigError(f"parallel.devices_per_job={per_job} is more than the {len(gpus)} visible GPU(s)")
    lock_dir.mkdir(parents=True, exist_ok=True)
    for i, devices in enumerate(sets):
        handle = open(lock_dir / f"devices_{i}.lock", "w")  # noqa: SIM115 (held open for the process's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        value = ",".join(devices)
        handle.write(f"{os.getpid()} {value}\n")
        handle.flush()
        os.environ["CUDA_VISIBLE_DEVICES"] = value
        _claimed = (handle, value)
        return value
    raise ConfigError(
        f"all {len(sets)} sets of parallel.devices_per_job={per_job} GPUs (of {len(gpus)}) are taken by other "
        f"jobs of this sweep: run at most {len(sets)} jobs at once (e.g. hydra.launcher.n_jobs={len(sets)})")
