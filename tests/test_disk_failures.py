"""A read-only or full disk ends a run in one ``prism: error:`` line naming the path, never in a flood of
orbax/asyncio tracebacks or an empty ``result.json``. The faults are real: a directory made unwritable with
root's override capabilities dropped (``setpriv``), and a small tmpfs mounted for the test."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from prism.framework.rundir import disk_failure, write_text_atomic

STEPS = ["train.steps=30", "train.eval_every=10", "logging.tensorboard=false", "logging.plots=false"]
#: root ignores permission bits; without these capabilities it obeys them like any user
DROP_OVERRIDES = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                  "--bounding-set=-dac_override,-dac_read_search"]


def _prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only for this process")
    return DROP_OVERRIDES


def _prism(prefix: list[str], *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "prism.framework", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=300)


def _errors(stderr: str) -> list[str]:
    """stderr without tqdm's progress lines and warnings of plugins loading."""
    return [line for line in stderr.splitlines() if line.strip() and "step/s" not in line and "Warning" not in line
            and not line.startswith("  _record_failure")]


def test_a_read_only_run_directory_is_one_line_before_anything_runs(tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    prefix = _prefix()
    try:
        if subprocess.run([*prefix, "touch", str(parent / "probe")], capture_output=True).returncode == 0:
            pytest.skip("the directory stayed writable for this process (a file system that ignores modes)")
        out = _prism(prefix, "train", *STEPS, f"hydra.run.dir={parent / 'run'}", cwd=REPO)
    finally:
        parent.chmod(0o755)
    assert out.returncode == 1
    assert _errors(out.stderr) == [f"prism: error: cannot write the run directory {parent / 'run'}: permission "
                                   f"denied; choose a writable hydra.run.dir"]
    assert not (parent / "run").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of a given size (skips where mounting is not permitted)."""
    mounts = []

    def mount(kib: int):
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): the full-disk "
                        f"fault needs root with CAP_SYS_ADMIN")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_no_room_for_a_checkpoint_is_refused_in_one_line_before_orbax_writes(small_disk):
    disk = small_disk(400)  # the run's files fit; a checkpoint (~0.2 MiB of arrays + 1 MiB margin) does not
    out = _prism([], "train", *STEPS, f"hydra.run.dir={disk / 'run'}", cwd=REPO)
    assert out.returncode == 2
    (line,) = _errors(out.stderr)
    assert line.startswith(f"prism: error: no space for the checkpoint at step 10 in {disk / 'run' / 'checkpoints'}")
    assert "MiB are free (no checkpoint was written)" in line
    result = json.loads((disk / "run" / "result.json").read_text())
    assert result["status"] == "failed" and result["error"].startswith("CheckpointError: no space")
    assert not any((disk / "run" / "checkpoints").iterdir())  # no partial step left behind


def test_a_disk_too_full_for_the_runs_own_files_is_one_line(small_disk):
    disk = small_disk(12)  # room for the lock and Hydra's files, not for the log
    out = _prism([], "train", *STEPS, f"hydra.run.dir={disk / 'run'}", cwd=REPO)
    assert out.returncode == 2
    (line,) = _errors(out.stderr)
    assert line.startswith(f"prism: error: cannot write {disk / 'run'}")
    assert "no space left on device (errno 28)" in line
    assert "result.json could not be written either" in line  # said, since the record is missing
    record = disk / "run" / "result.json"
    assert not record.exists() or json.loads(record.read_text())["status"] == "failed"  # never empty


def test_disk_failures_are_recognized_through_orbax_and_exception_chains(tmp_path):
    orbax = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/runs/a/checkpoints/20/_sharding": Failed '
                       "to write 5142 bytes to file 11: No space left on device [os_error_code='28']")
    assert disk_failure(orbax) == "cannot write /runs/a/checkpoints/20/_sharding: no space left on device (errno 28)"
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/runs/b/metrics.jsonl")
        except OSError as inner:
            raise RuntimeError("logging failed") from inner
    except RuntimeError as outer:
        assert disk_failure(outer) == "cannot write /runs/b/metrics.jsonl: read-only file system (errno 30)"
    assert disk_failure(OSError(errno.ENOSPC, "No space left on device"), where="/runs/c") == \
        "cannot write /runs/c: no space left on device (errno 28)"
    assert disk_failure(ValueError("a bad value")) is None


def test_an_atomic_write_that_fails_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_text_atomic(path, '{"status": "completed"}')

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_text_atomic(path, '{"status": "failed"}')
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # the temporary file is gone
