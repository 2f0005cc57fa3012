"""A run directory's safety: one process at a time, and a finished run's record never overwritten.

Two ``prism train`` processes in one directory would resume from each other's live checkpoints, delete each
other's in-flight saves and interleave ``metrics.jsonl``. The lock is ``fcntl.flock`` on ``RUN_LOCK`` in the
run directory: the kernel releases it when its holder exits, however it exits (kill -9 included), so a lock
is never stale; the file keeps the holder's PID for the message the next process prints. The processes of
one multi-process run share their directory: the first (rank 0, from the environment) holds the lock.

A directory whose ``result.json`` says ``completed`` holds a finished run. A later attempt there that fails
(a refused resume with another model, a bad value) writes its record under ``attempts/<time>-<pid>/`` instead
(its ``result.json`` and the ``.hydra/`` files Hydra wrote for it), and the finished run's ``.hydra/`` files
are put back (:class:`FinishedRunGuard`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO

from prism.framework.errors import PrismError

RUN_LOCK = ".prism.lock"
RESULT_FILE = "result.json"
#: Where a run keeps its checkpoints and its pictures of predictions, inside its run directory.
CHECKPOINTS_DIR = "checkpoints"
PREDICTIONS_DIR = "predictions"
ATTEMPTS_DIR = "attempts"
HYDRA_DIR = ".hydra"


class RunDirectoryBusy(PrismError):
    """Another live process trains in this run directory."""


class RunDirectoryUnwritable(PrismError):
    """The run directory cannot be written (read-only, no permission, no space)."""


#: The errors of a disk that refuses a write, as a user reads them.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EDQUOT: "disk quota exceeded"}
#: How orbax/tensorstore report an OS error inside their own exceptions (``[os_error_code='28']``) and the file.
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_FILE = re.compile(r'(?:local file|Failed writing:) "([^"]+)"')


def check_writable(directory: str | Path) -> None:
    """Raise :class:`RunDirectoryUnwritable` (one line) unless a file can be created in ``directory`` (made when
    missing): before a run starts, so that a read-only or full disk is named at once, not as a flood of
    tracebacks from the first checkpoint's background threads."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".prism-probe-", dir=directory)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        reason = DISK_ERRORS.get(exc.errno, exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != directory else ""
        raise RunDirectoryUnwritable(f"cannot write the run directory {directory}: {reason}{where}; choose a "
                                     f"writable hydra.run.dir") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it): a full disk leaves the previous
    file, never a truncated or empty one."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def disk_failure(exc: BaseException, where: str | Path | None = None) -> str | None:
    """``cannot write FILE: REASON (errno N)`` when ``exc`` (or an exception it came from) is a disk refusing a
    write (full, read-only, no permission), including orbax's and tensorstore's wrapped reports; else None.
    ``where`` names the place when the error names no file (a write to an open file)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if code not in DISK_ERRORS:
            found = _OS_CODE.search(str(current))
            code = int(found.group(1)) if found else None
        if code in DISK_ERRORS:
            path = getattr(current, "filename", None) or next(iter(_FILE.findall(str(current))), None)
            return f"cannot write {path or where or 'the run directory'}: {DISK_ERRORS[code]} (errno {code})"
        current = current.__cause__ or current.__context__
    return None


class RunDirectoryLock:
    """``with RunDirectoryLock(run_dir):`` holds the run directory for this process, or raises
    :class:`RunDirectoryBusy` at once (no waiting) naming the directory and the holder's PID."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / RUN_LOCK
        self._handle: IO[str] | None = None

    def acquire(self) -> RunDirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - kept open: the lock lives as long as the handle
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirectoryBusy(f"run directory {self.path.parent} is in use by another prism process (PID "
                                   f"{holder}); wait for it to finish or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunDirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def run_directory_lock(run_dir: str | Path) -> contextlib.AbstractContextManager:
    """The lock of ``run_dir`` for this run: held by its first process only (the other processes of a
    multi-process run share the directory with it)."""
    from prism.framework.parallel import env_process_index

    return RunDirectoryLock(run_dir) if env_process_index() == 0 else contextlib.nullcontext()


def check_free(run_dir: str | Path) -> None:
    """Raise :class:`RunDirectoryBusy` when a live process holds ``run_dir`` (before anything is written
    there: Hydra writes ``.hydra/`` before the run starts). Nothing is created when the directory is absent."""
    if (Path(run_dir) / RUN_LOCK).exists():
        RunDirectoryLock(run_dir).acquire().release()


def finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``result.json`` says ``completed``)."""
    try:
        return json.loads(Path(run_dir, RESULT_FILE).read_text()).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def failure_record(run_dir: str | Path) -> Path:
    """Where a failed attempt in ``run_dir`` writes its ``result.json``: the run's own, or, over a finished
    run, a new ``attempts/<time>-<pid>/`` holding it and a copy of the attempt's ``.hydra/`` files."""
    run_dir = Path(run_dir)
    if not finished(run_dir):
        return run_dir / RESULT_FILE
    attempt = run_dir / ATTEMPTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    attempt.mkdir(parents=True, exist_ok=True)
    if (run_dir / HYDRA_DIR).is_dir():
        shutil.copytree(run_dir / HYDRA_DIR, attempt / HYDRA_DIR, dirs_exist_ok=True)
    return attempt / RESULT_FILE


class FinishedRunGuard:
    """Around a single ``prism train`` into ``run_dir``: remembers a finished run's ``.hydra/`` files (Hydra
    rewrites them before the run starts) and puts them back when the attempt failed (a new ``attempts/``
    entry appeared)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.saved: dict[str, bytes] | None = None
        if finished(self.run_dir) and (self.run_dir / HYDRA_DIR).is_dir():
            self.saved = {p.name: p.read_bytes() for p in (self.run_dir / HYDRA_DIR).iterdir() if p.is_file()}
        self.attempts_before = self._attempts()

    def _attempts(self) -> set[str]:
        folder = self.run_dir / ATTEMPTS_DIR
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def restore_if_failed(self) -> Path | None:
        """The failed attempt's folder (after restoring the finished run's ``.hydra/``), else None."""
        new = sorted(self._attempts() - self.attempts_before)
        if self.saved is None or not new:
            return None
        for name, data in self.saved.items():
            (self.run_dir / HYDRA_DIR / name).write_bytes(data)
        return self.run_dir / ATTEMPTS_DIR / new[-1]
