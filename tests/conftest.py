"""Shared test set-up: 4 simulated CPU devices (set before JAX is imported) and small run helpers."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole test session, subprocesses included: the same tiny
# programs are compiled by many tests.
_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Datasets prepared by the tests (TFDS array_record files) go here, not into ~/tensorflow_datasets.
os.environ.setdefault("PRISM_DATA_DIR", os.path.join(os.path.dirname(_CACHE), "tensorflow_datasets"))
# `prism list model --stats` caches model sizes here, not in the user's ~/.cache/prism.
os.environ.setdefault("PRISM_CACHE_DIR", os.path.join(os.path.dirname(_CACHE), "prism"))

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

#: Overrides that make a digits run take seconds: few steps, small batch, no progress bar.
FAST = ["train.steps=20", "train.batch_size=32", "train.eval_every=10", "logging.progress=false",
        "model.widths=[8,16]"]


def run_prism(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the ``prism`` CLI in a subprocess (as a user would), capturing its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "prism.framework", *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


def finish_all(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    """Wait for processes started together (peers of one distributed run), kill any left on the way out, and
    assert each exited 0 (showing the end of a failed one's output); returns their outputs."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


EXAMPLE_PACKAGE = REPO / "tests" / "plugin_package"


def install_example_package(root: Path) -> Path:
    """pip-install ``tests/plugin_package`` (built from a copy, so no build/ or *.egg-info lands in the repo)
    into ``root/site``; returns that directory (put it on PYTHONPATH)."""
    import shutil

    source, target = root / "src", root / "site"
    shutil.copytree(EXAMPLE_PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def read_result(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "result.json").read_text())


@pytest.fixture
def train_run(tmp_path):
    """Build and fit a Trainer in-process from overrides; returns ``(trainer, result)``."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    def _run(overrides: list[str], run_dir: Path | None = None):
        trainer = Trainer(compose([*FAST, *overrides]), run_dir or tmp_path / "run")
        return trainer, trainer.fit()

    return _run
