"""Multi-host data parallelism for real: two processes on localhost form one JAX runtime.

Each process has 2 simulated CPU devices (4 in all), calls ``jax.distributed.initialize()`` from the
environment (``JAX_COORDINATOR_ADDRESS``, ``PRISM_NUM_PROCESSES``, ``PRISM_PROCESS_ID``), and feeds its
own half of every global batch. The loss curve and final metrics must equal a single-process run on
4 devices with the same config.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import FAST, REPO, finish_all, read_result

OVERRIDES = [*FAST, "train.log_every=1", "checkpoint.enabled=false", "logging.tensorboard=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r]


def _launch(run_dir, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism.framework", "train", *OVERRIDES, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_processes_train_like_one(tmp_path):
    port = _free_port()
    multi_dir, single_dir = tmp_path / "two_hosts", tmp_path / "one_host"
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [
        _launch(multi_dir, {**two_devices, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                            "PRISM_NUM_PROCESSES": "2", "PRISM_PROCESS_ID": str(i)})
        for i in range(2)
    ]
    finish_all(procs, timeout=240)
    single = _launch(single_dir, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    out = single.communicate(timeout=240)[0]
    assert single.returncode == 0, out[-3000:]

    multi, one = read_result(multi_dir), read_result(single_dir)
    assert (multi["processes"], multi["devices"]) == (2, 4)
    assert (one["processes"], one["devices"]) == (1, 4)
    assert multi["steps"] == one["steps"] == 20
    losses_multi, losses_one = _losses(multi_dir), _losses(single_dir)
    assert len(losses_multi) == len(losses_one) == 20
    import numpy as np

    np.testing.assert_allclose(losses_multi, losses_one, rtol=1e-4, atol=1e-6)
    for name, value in one["metrics"].items():
        assert abs(multi["metrics"][name] - value) < 1e-4, name


def test_a_signal_to_one_process_stops_and_saves_all_at_the_same_step(tmp_path):
    """SIGTERM reaches only process 1: both agree on the step (the save and the steps after are collective:
    without agreement process 1 would wait in its save for a process that trains on), save it once, end
    ``preempted``; restarted, the run resumes from that step and completes."""
    import signal
    import time

    port = _free_port()
    run_dir = tmp_path / "two_hosts"
    env = lambda i: {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # noqa: E731
                     "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "PRISM_NUM_PROCESSES": "2",
                     "PRISM_PROCESS_ID": str(i)}
    long_run = ["train.steps=400", "train.eval_every=400", "checkpoint.enabled=true", "train.log_every=1"]

    def launch(i: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "prism.framework", "train", *OVERRIDES, *long_run,
                                 f"hydra.run.dir={run_dir}"], cwd=REPO, env={**os.environ, **env(i)}, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    procs = [launch(0), launch(1)]
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        assert all(p.poll() is None for p in procs), "a process ended before the signal"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish_all(procs, timeout=120)
    result = read_result(run_dir)
    assert result["status"] == "preempted" and result["signal"].startswith("SIGTERM") and result["resumable"]
    assert [p.returncode for p in procs] == [0, 0]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [result["steps"]] and 5 <= result["steps"] < 400
    assert "(received by another process) received: saved step" in outputs[0]  # rank 0 logs for the run

    port = _free_port()
    finish_all([launch(0), launch(1)], timeout=240)
    done = read_result(run_dir)
    assert done["status"] == "completed" and done["steps"] == 400
