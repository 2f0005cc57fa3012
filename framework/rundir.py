"""One process per run directory: a lock held for as long as a run trains there.

Two ``prism train`` processes in one directory would resume from each other's live checkpoints, delete each
other's in-flight saves and interleave ``metrics.jsonl``. The lock is ``fcntl.flock`` on ``RUN_LOCK`` in the
run directory: the kernel releases it when its holder exits, however it exits (kill -9 included), so a lock
is never stale; the file keeps the holder's PID for the message the next process prints. The processes of
one multi-process run share their directory: the first (rank 0, from the environment) holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

from prism.framework.errors import PrismError

RUN_LOCK = ".prism.lock"


class RunDirectoryBusy(PrismError):
    """Another live process trains in this run directory."""


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
