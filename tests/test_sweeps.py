"""Sweeps through Hydra's real launchers and sweepers (joblib, submitit_local, Optuna), the end-of-sweep
failure summary, ``prism sweep-report``, per-job GPU sets, and ``jax.distributed`` from a SLURM environment.

Each job is the tiniest run (simple_cnn of width 4 on digits, 4 steps), so a job costs its start-up.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from conftest import REPO, finish_all, read_result, run_prism

from prism.framework.cli import check_group_choices
from prism.framework.errors import ConfigError
from prism.framework.parallel import _env_describes_multiprocess, _slurm_local_device_ids
from prism.framework.sweep import parse_overrides

TINY = ["train.steps=4", "train.batch_size=16", "train.eval_every=2", "logging.progress=false",
        "checkpoint.enabled=false", "logging.tensorboard=false", "logging.plots=false"]


def _jobs(sweep) -> list[str]:
    return sorted((p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")), key=int)


def _hydra_plugin(name: str, extra: str = "test") -> None:
    pytest.importorskip(f"hydra_plugins.{name}", reason=f"{name} is in the {extra} extra: pip install -e '.[{extra}]'")


def test_repeated_sweep_key_is_rejected():
    with pytest.raises(ConfigError, match=r"model.widths is given 2 times .*model.widths=a,b,c"):
        check_group_choices(["model.widths=[4],[8]", "model.widths=[8,16]"])
    check_group_choices(["train.steps=20", "train.steps=4", "seed=0,1"])  # repeated plain values: the last wins


def test_claim_devices_gives_each_process_its_own_set(tmp_path):
    """Three job processes ask for 2 GPUs each out of 4: two get disjoint sets, the third a clear error."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from prism.framework.sweep import claim_devices
        try:
            print(claim_devices(2, Path({str(tmp_path)!r})), flush=True)
        except Exception as exc:
            print(f"{{type(exc).__name__}}: {{exc}}", flush=True)
        time.sleep(float(sys.argv[1]))
    """)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3,4,6,7", "PYTHONPATH": str(REPO)}
    holders = [subprocess.Popen([sys.executable, "-c", script, "20"], env=env, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        claimed = sorted(p.stdout.readline().strip() for p in holders)
        third = subprocess.run([sys.executable, "-c", script, "0"], env=env, capture_output=True, text=True,
                               timeout=60)
    finally:
        for p in holders:
            p.kill()
            p.wait()
    assert claimed == ["3,4", "6,7"]
    assert third.stdout.startswith("ConfigError: all 2 sets of parallel.devices_per_job=2 GPUs (of 4) are taken")
    # a finished process frees its set
    again = subprocess.run([sys.executable, "-c", script, "0"], env=env, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "3,4"


def test_slurm_local_device_ids(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "CUDA_VISIBLE_DEVICES",
                "SLURM_GPUS_ON_NODE", "PRISM_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    assert _slurm_local_device_ids() is None  # not under SLURM
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_NTASKS", "16")  # one task per GPU: JAX's default (the SLURM_LOCALID-th GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert _slurm_local_device_ids() is None
    monkeypatch.setenv("SLURM_NTASKS", "2")  # one task per node: all of the node's GPUs
    assert _slurm_local_device_ids() == list(range(8))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    assert _slurm_local_device_ids() == [0, 1, 2, 3]


def test_auto_distributed_only_in_an_srun_task(monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
                "PRISM_NUM_PROCESSES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # an salloc/sbatch shell: one process, whatever the allocation
    assert not _env_describes_multiprocess()
    for var, value in {"SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"}.items():
        monkeypatch.setenv(var, value)  # a task started by srun
    assert _env_describes_multiprocess()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not _env_describes_multiprocess()


@pytest.mark.slow
def test_joblib_sweep_survives_failed_jobs_and_reports(tmp_path):
    """4 jobs in 2 joblib processes: the 2 with an invalid value fail, the others run; the sweep exits 1 with a
    summary, each failed directory says why, and sweep-report aggregates the completed seeds."""
    _hydra_plugin("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    proc = run_prism("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.widths=[4]",
                     "dataset.test_fraction=0.2,1.5", "seed=0,1", "parallel.devices_per_job=1", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "0,1"})

    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "2 of 4 sweep job(s) did not complete" in proc.stderr, proc.stderr[-4000:]
    overrides = {j: yaml.safe_load((sweep / j / ".hydra" / "overrides.yaml").read_text()) for j in _jobs(sweep)}
    assert len(overrides) == 4
    completed = []
    for job, args in overrides.items():
        result = read_result(sweep / job)
        if "dataset.test_fraction=1.5" in args:
            assert result["status"] == "failed"
            assert result["error"] == "ConfigError: dataset.test_fraction must be in (0, 1), got 1.5"
            assert f"  {job} [failed] dataset.test_fraction=1.5 seed=" in proc.stderr
        else:
            assert result["status"] == "completed" and result["steps"] == 4
            assert result["visible_devices"] in ("0", "1")  # its own GPU set (ignored by the CPU backend)
            completed.append((job, result))
    assert len(completed) == 2

    report = run_prism("sweep-report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-4000:]
    with (sweep / "report.csv").open() as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(overrides)
    for job, result in completed:
        row = rows[job]
        assert row["status"] == "completed"
        assert float(row["eval/accuracy (final)"]) == pytest.approx(result["metrics"]["eval/accuracy"])
        assert float(row["eval/loss"]) == pytest.approx(result["metrics"]["eval/loss"])
        assert float(row["wall_s"]) == pytest.approx(result["wall_s"])
        evals = [r for r in map(json.loads, (sweep / job / "metrics.jsonl").read_text().splitlines())
                 if "eval/accuracy" in r]
        best = max(evals, key=lambda r: r["eval/accuracy"])  # first of the best (ties keep the earlier step)
        assert float(row["eval/accuracy (best)"]) == pytest.approx(best["eval/accuracy"])
        assert int(row["best step"]) == best["step"]
    for job in set(overrides) - {j for j, _ in completed}:
        assert rows[job]["status"] == "failed" and "test_fraction" in rows[job]["error"]

    with (sweep / "report_seeds.csv").open() as f:
        seeds = {r["dataset.test_fraction"]: r for r in csv.DictReader(f)}
    accs = [r["metrics"]["eval/accuracy"] for _, r in completed]
    assert seeds["0.2"]["seeds"] == "2"
    assert float(seeds["0.2"]["eval/accuracy mean"]) == pytest.approx(statistics.fmean(accs))
    assert float(seeds["0.2"]["eval/accuracy std"]) == pytest.approx(statistics.stdev(accs))
    assert seeds["1.5"]["seeds"] == "0"
    md = (sweep / "report.md").read_text()
    assert "4 jobs, 2 completed" in md and "**Best configuration:** `dataset.test_fraction=0.2`" in md

    typo = run_prism("sweep-report", str(sweep), "--metric", "eval/acc", cwd=tmp_path)  # no job reports it
    assert typo.returncode != 0
    assert "no job of the sweep reports metric 'eval/acc' (did you mean eval/accuracy?)" in typo.stderr
    assert "eval/loss" in typo.stderr and "Traceback" not in typo.stderr
    assert (sweep / "report.md").read_text() == md  # the good report stays
    for png in ("target_vs_params.png", "learning_curves.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_prism_launcher_runs_every_job_whatever_happens_to_the_others(tmp_path):
    """hydra/launcher=prism with a process per job: job 0's process is killed (kill -9) mid-run, job 1's
    directory is a file, job 2 still runs and completes; the summary lists both failures with their reasons, and
    sweep-report tabulates all three jobs."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "1").write_text("in the way")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prism.framework", "train", "-m", "hydra/launcher=prism",
         "hydra.launcher.processes=true", "model.widths=[4]", "train.steps=100000,4,4", *TINY[1:],
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = sweep / "0" / ".prism.lock"
        deadline = time.monotonic() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        os.kill(int(lock.read_text().split()[0]), signal.SIGKILL)  # job 0's own process, mid-run
        _, stderr = proc.communicate(timeout=240)
    finally:
        proc.kill()

    assert proc.returncode == 1, stderr[-4000:]
    assert "2 of 3 sweep job(s) did not complete" in stderr, stderr[-4000:]
    assert "  0 [failed] train.steps=100000\n      the job's process was killed by SIGKILL" in stderr
    assert "  1 [failed] train.steps=4\n      FileExistsError: " in stderr and str(sweep / "1") in stderr
    assert read_result(sweep / "0") == {"status": "failed", "error": "the job's process was killed by SIGKILL"}
    assert (sweep / "1").read_text() == "in the way"
    assert read_result(sweep / "2")["status"] == "completed" and read_result(sweep / "2")["steps"] == 4

    from prism.framework.sweep_report import main as sweep_report

    assert sweep_report([str(sweep)]) == 0
    with (sweep / "report.csv").open() as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert {job: row["status"] for job, row in rows.items()} == {"0": "failed", "1": "failed", "2": "completed"}
    assert "FileExistsError" in rows["1"]["error"]


def test_sweep_jobs_include_launcher_records_without_a_directory(tmp_path):
    """A job the prism launcher recorded but that never got its directory is listed, in job order, with its
    recorded failure; a record beside a real job directory adds nothing."""
    from prism.framework.sweep import LAUNCHER_RECORDS, failure_summary, read_jobs

    sweep = tmp_path / "sweep"
    for num, seed in ((0, 0), (2, 2)):
        (sweep / str(num) / ".hydra").mkdir(parents=True)
        (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
        (sweep / str(num) / "result.json").write_text('{"status": "completed"}')
    records = sweep / LAUNCHER_RECORDS
    records.mkdir()
    for num in range(3):
        record = {"num": num, "overrides": [f"seed={num}"], "dir": str(sweep / str(num))}
        if num == 1:
            record.update(status="failed", error="NotADirectoryError: job dir")
        (records / f"{num}.json").write_text(json.dumps(record))

    jobs = read_jobs(sweep)
    assert [(j.name, j.status, j.overrides) for j in jobs] == [
        ("0", "completed", {"seed": "0"}), ("1", "failed", {"seed": "1"}), ("2", "completed", {"seed": "2"})]
    summary = failure_summary(sweep, jobs)
    assert summary.splitlines()[:3] == [f"1 of 3 sweep job(s) did not complete (sweep directory {sweep}):",
                                        "  1 [failed] seed=1", "      NotADirectoryError: job dir"]


@pytest.mark.slow
def test_optuna_sweep_maximizes_the_returned_metric(tmp_path):
    """4 Optuna trials over the learning rate, stored in SQLite; the study's best value is the best job's final
    accuracy."""
    _hydra_plugin("hydra_optuna_sweeper")
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path}/study.db"
    proc = run_prism("train", "-m", "hydra/sweeper=optuna_prism", "hydra.sweeper.n_trials=4", "model.widths=[4]",
                     f"hydra.sweeper.storage='{storage}'", "hydra.sweeper.study_name=lr",
                     "optimizer.lr=tag(log, interval(1e-4, 1e-1))", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = _jobs(sweep)
    assert jobs == ["0", "1", "2", "3"]
    lrs, accs = [], []
    for job in jobs:
        assert read_result(sweep / job)["status"] == "completed"
        args = parse_overrides(yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text()))
        lrs.append(float(args["optimizer.lr"]))
        accs.append(read_result(sweep / job)["metrics"]["eval/accuracy"])
    assert all(1e-4 <= lr <= 1e-1 for lr in lrs) and len(set(lrs)) == 4
    study = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert study["best_value"] == pytest.approx(max(accs))  # maximized (checkpoint.best_mode=max)
    assert float(study["best_params"]["optimizer.lr"]) == pytest.approx(lrs[accs.index(max(accs))])
    import optuna

    stored = optuna.load_study(study_name="lr", storage=storage)  # a later sweep can resume this study
    assert sorted(t.value for t in stored.trials) == pytest.approx(sorted(accs))


@pytest.mark.slow
def test_submitit_local_sweep_records_a_failed_job(tmp_path):
    """submitit's local executor runs each job in its own process; a failed one is summarized at the end."""
    _hydra_plugin("hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    proc = run_prism("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                     "model.widths=[4]", "dataset.test_fraction=0.2,1.5", *TINY, f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "1 of 2 sweep job(s) did not complete" in proc.stderr
    assert "  1 [failed] dataset.test_fraction=1.5" in proc.stderr
    assert read_result(sweep / "0")["status"] == "completed"
    assert read_result(sweep / "1")["status"] == "failed"
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2  # one submitit job (process) per sweep job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_slurm_tasks_initialize_jax_distributed(tmp_path):
    """Two processes with the environment ``srun`` gives two tasks of one job: parallel.distributed=auto
    calls jax.distributed.initialize(), which finds the coordinator, count and rank in SLURM_* alone."""
    run_dir = tmp_path / "run"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PRISM_", "JAX_COORDINATOR"))}
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
             "SLURM_STEP_NUM_NODES": "1", "JAX_COORDINATOR_PORT": str(_free_port()),
             "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, "-m", "prism.framework", "train", "model.widths=[4]", *TINY,
                               f"hydra.run.dir={run_dir}"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env={**base, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
             for i in range(2)]
    finish_all(procs, timeout=300)
    result = read_result(run_dir)
    assert (result["processes"], result["devices"], result["status"]) == (2, 4, "completed")


@pytest.mark.slow
def test_ray_sweep(tmp_path):
    """Hydra's Ray launcher (the optional ``ray`` extra) on a local Ray instance: a job per Ray task."""
    _hydra_plugin("hydra_ray_launcher", extra="ray")
    sweep = tmp_path / "sweep"
    proc = run_prism("train", "-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                     "+hydra.launcher.ray.init.include_dashboard=false", "model.widths=[4]",
                     "dataset.test_fraction=0.2,1.5", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)

    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "1 of 2 sweep job(s) did not complete" in proc.stderr
    assert read_result(sweep / "0")["status"] == "completed"
    assert read_result(sweep / "1")["status"] == "failed"
