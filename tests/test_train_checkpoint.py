"""Checkpoints: exact resume after kill -9, clean exit on SIGTERM, keep-last-K-plus-best, refusal of
an incompatible checkpoint, and the input pipeline's position stored beside the train state.

The process-boundary tests run ``python -m prism.framework train`` in subprocesses (4 simulated devices,
inherited from ``conftest``); they share a persistent XLA compilation cache so that the runs of one
config compile once.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FAST, REPO, read_result, run_prism

from prism.framework.checkpoint import Checkpointer
from prism.framework.config import compose
from prism.framework.data import train_dataset, train_iterator
from prism.framework.errors import CheckpointError, ConfigError
from prism.framework.logging import read_metrics
from prism.framework.train import Trainer

#: 40 steps, a checkpoint every 10, metrics every step (also slows the loop enough to be killed mid-run).
RESUME_RUN = [*FAST, "train.steps=40", "checkpoint.every=10", "train.log_every=1", "logging.tensorboard=false",
              "logging.plots=false"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict[str, str]:
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("xla_cache"))}


def _steps(checkpoint_dir: Path) -> list[int]:
    """Finished checkpoints (orbax renames a step's temporary directory to ``<step>`` when complete)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism.framework", "train", *args], cwd=REPO,
                            env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, checkpoint_dir: Path, min_step: int, timeout: float = 240) -> int:
    """Poll until a checkpoint of step >= ``min_step`` is complete; fails if the run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [s for s in _steps(checkpoint_dir) if s >= min_step]
        if done:
            return done[0]
        if proc.poll() is not None:
            output = proc.stdout.read()
            pytest.fail(f"the run ended (rc={proc.returncode}) before a checkpoint >= {min_step}:\n{output[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no checkpoint >= {min_step} after {timeout}s")


#: Restoring any checkpoint fails: restoring calls ``jax.random.key_impl`` on the abstract
#: ShapeDtypeStruct of the dropout RNG key (TypeError: unexpected PRNG key type ShapeDtypeStruct).
def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else x) for p, x in leaves}


def _restore(run_dir: Path, step: int, overrides: list[str], tmp_path: Path):
    """``(state, data_state, meta)`` of a run's checkpoint, restored into the config's abstract state."""
    trainer = Trainer(compose([*overrides, "checkpoint.enabled=false"]), tmp_path / f"restore_{run_dir.name}_{step}")
    cfg = compose(overrides).checkpoint
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg)
    try:
        return checkpointer.restore(step, trainer.abstract_state)
    finally:
        checkpointer.close()


@pytest.mark.parametrize("placement", ["host", "device"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, cache_env, placement):
    """On both data placements: on ``device`` the checkpoint holds the example-index stream's position."""
    run = [*RESUME_RUN, f"loader.placement={placement}"]
    dir_a, dir_b = tmp_path / "uninterrupted", tmp_path / "killed"
    proc = run_prism("train", *run, f"hydra.run.dir={dir_a}", cwd=REPO, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_a = read_result(dir_a)

    b = _start([*run, f"hydra.run.dir={dir_b}"], cache_env)
    try:
        _wait_for_checkpoint(b, dir_b / "checkpoints", 20)
        b.send_signal(signal.SIGKILL)
        b.wait(timeout=60)
    finally:
        if b.poll() is None:
            b.kill()
        b.stdout.close()
    assert b.returncode == -signal.SIGKILL
    assert not (dir_b / "result.json").exists()
    killed_at = max(_steps(dir_b / "checkpoints"))
    assert 20 <= killed_at < 40, f"the run was not interrupted mid-way (latest checkpoint {killed_at})"
    logged_before = [r["step"] for r in read_metrics(dir_b) if "train/loss" in r]

    proc = run_prism("train", *run, f"hydra.run.dir={dir_b}", cwd=REPO, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from the checkpoint at step {killed_at}" in proc.stdout + proc.stderr
    result_b = read_result(dir_b)
    assert result_b["status"] == "completed" and result_b["steps"] == 40
    assert result_b["metrics"] == result_a["metrics"]  # bit-identical evaluation

    # metrics.jsonl: the resumed run dropped what the killed attempt logged after its checkpoint and appended
    # steps killed_at+1..40 once each; every logged loss equals the uninterrupted run's loss at that step
    loss_a = {r["step"]: r["train/loss"] for r in read_metrics(dir_a) if "train/loss" in r}
    records_b = [r for r in read_metrics(dir_b) if "train/loss" in r]
    steps_b = [r["step"] for r in records_b]
    assert steps_b == [s for s in logged_before if s <= killed_at] + list(range(killed_at + 1, 41))
    for r in records_b:
        assert r["train/loss"] == loss_a[r["step"]], r["step"]

    # the final train states are identical: params, BatchNorm statistics, RNG streams, optimizer state
    state_a, data_a, _ = _restore(dir_a, 40, run, tmp_path)
    state_b, data_b, _ = _restore(dir_b, 40, run, tmp_path)
    flat_a, flat_b = _flat(state_a), _flat(state_b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=path)
    assert int(flat_b[".step"]) == 40
    assert data_a == data_b


SIGTERM_RUN = [*FAST, "train.steps=100", "train.eval_every=50", "checkpoint.every=10", "logging.tensorboard=false",
               "logging.plots=false"]


def _signalled(run_dir: Path, env: dict[str, str], sig: signal.Signals) -> tuple[Path, int, str, int]:
    """A 100-step run sent ``sig`` once its first checkpoint is on disk: ``(run_dir, rc, output, first)``."""
    proc = _start([*SIGTERM_RUN, f"hydra.run.dir={run_dir}"], env)
    try:
        first = _wait_for_checkpoint(proc, run_dir / "checkpoints", 1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return run_dir, proc.returncode, output, first


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, cache_env):
    return _signalled(tmp_path_factory.mktemp("preempted"), cache_env, signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_and_exits_0(preempted):
    run_dir, returncode, output, first = preempted
    assert returncode == 0, output[-3000:]
    assert "SIGTERM" in output
    result = read_result(run_dir)
    assert result["status"] == "preempted"
    stopped = result["steps"]
    assert first <= stopped < 100
    assert f"saved step {stopped}" in output
    assert max(_steps(run_dir / "checkpoints")) == stopped
    assert (run_dir / "checkpoints" / str(stopped) / "state").is_dir()


def test_ctrl_c_saves_like_sigterm_and_exits_130(tmp_path, cache_env):
    run_dir, returncode, output, first = _signalled(tmp_path / "run", cache_env, signal.SIGINT)
    assert returncode == 130, output[-3000:]
    result = read_result(run_dir)
    assert result["status"] == "preempted" and result["signal"] == "SIGINT" and result["resumable"] is True
    assert f"SIGINT received: saved step {result['steps']}" in output and "Traceback" not in output
    assert max(_steps(run_dir / "checkpoints")) == result["steps"] >= first


def test_sigterm_without_checkpoints_says_nothing_was_saved(tmp_path, capsys):
    import threading

    from prism.framework.config import compose
    from prism.framework.train import Trainer

    run_dir = tmp_path / "run"
    trainer = Trainer(compose([*FAST, "train.steps=100000", "checkpoint.enabled=false", "train.log_every=1",
                               "logging.tensorboard=false", "logging.plots=false"]), run_dir)

    def signal_once_training():  # a real SIGTERM to this process once the first step is logged
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_training, daemon=True).start()
    result = trainer.fit()
    assert result["status"] == "preempted" and result["signal"] == "SIGTERM" and result["resumable"] is False
    assert result["steps"] < 100000
    out = capsys.readouterr().out
    assert f"SIGTERM received: stopped at step {result['steps']}; nothing was saved" in out and "saved step" not in out


def test_rerun_after_sigterm_resumes_and_completes(preempted, cache_env):
    run_dir = preempted[0]
    stopped = read_result(run_dir)["steps"]
    proc = run_prism("train", *SIGTERM_RUN, f"hydra.run.dir={run_dir}", cwd=REPO, env=cache_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from the checkpoint at step {stopped}" in proc.stdout + proc.stderr
    result = read_result(run_dir)
    assert result["status"] == "completed" and result["steps"] == 100
    assert max(_steps(run_dir / "checkpoints")) == 100
    assert set(result["metrics"]) >= {"eval/accuracy", "eval/loss"}
    logged = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert logged[-1] == 100 and logged == sorted(logged)  # log_every=10: no step is logged twice


#: Evaluations (and so checkpoints) at 5, 10, ..., 30; keep the last 2 plus the best.
KEEP_RUN = [*FAST, "train.steps=30", "train.eval_every=5", "checkpoint.keep=2", "checkpoint.best_metric=eval/accuracy",
            "logging.tensorboard=false", "logging.plots=false"]


@pytest.fixture(scope="module")
def keep_min_run(tmp_path_factory):
    """``best_mode=min``: the "best" accuracy is an early one, so it is not among the last two."""
    run_dir = tmp_path_factory.mktemp("keep_min")
    trainer = Trainer(compose([*KEEP_RUN, "checkpoint.best_mode=min"]), run_dir)
    result = trainer.fit()
    return trainer, result, run_dir


def _expected_kept(run_dir: Path, mode: str, keep: int = 2) -> tuple[set[int], list[int]]:
    accuracy = {r["step"]: r["eval/accuracy"] for r in read_metrics(run_dir) if "eval/accuracy" in r}
    assert sorted(accuracy) == [5, 10, 15, 20, 25, 30]
    best_value = (max if mode == "max" else min)(accuracy.values())
    best = [s for s, v in accuracy.items() if v == best_value]
    return set(sorted(accuracy)[-keep:]), best


def test_keeps_last_k_plus_an_early_best(keep_min_run):
    _, result, run_dir = keep_min_run
    last, best = _expected_kept(run_dir, "min")
    kept = set(_steps(run_dir / "checkpoints"))
    assert last == {25, 30}
    assert not set(best) & last, "the construction failed: the lowest accuracy is among the last two"
    # among equal metrics the latest is kept (orbax BestN sorts stably)
    assert kept == last | {max(best)}
    assert result["best_step"] == max(best)


def test_keeps_last_k_plus_the_best(tmp_path):
    run_dir = tmp_path / "keep_max"
    result = Trainer(compose(KEEP_RUN), run_dir).fit()
    last, best = _expected_kept(run_dir, "max")
    kept = set(_steps(run_dir / "checkpoints"))
    assert kept == last | {max(best)}
    assert result["best_step"] == max(best)


def test_checkpoint_restores_the_final_state(keep_min_run, tmp_path):
    trainer, _, run_dir = keep_min_run
    state, _, meta = _restore(run_dir, 30, [*KEEP_RUN, "checkpoint.best_mode=min"], tmp_path)
    final, restored = _flat(trainer.state), _flat(state)
    assert final.keys() == restored.keys()
    for path in final:
        np.testing.assert_array_equal(restored[path], final[path], err_msg=path)
    for leaf, ref in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state), strict=True):
        assert leaf.sharding.is_equivalent_to(ref.sharding, leaf.ndim)
    assert meta["model"] == "simple_cnn" and meta["config"]["train"]["steps"] == 30


def test_rerunning_a_finished_run_keeps_its_result(keep_min_run, tmp_path):
    _, result, run_dir = keep_min_run
    copy = tmp_path / "finished"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    shutil.copy(run_dir / "result.json", copy / "result.json")
    again = Trainer(compose([*KEEP_RUN, "checkpoint.best_mode=min"]), copy).fit()
    assert again["status"] == "completed" and again["steps"] == 30
    assert again["metrics"] == result["metrics"]
    assert read_result(copy)["metrics"] == result["metrics"]
    assert again["train_metrics"] == result["train_metrics"] != {}  # not lost by the re-run


def _read_items(run_dir: Path, step: int) -> dict:
    """The JSON items (data iterator state, meta) of a checkpoint, read with orbax directly."""
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore(),
                                                                  meta=ocp.args.JsonRestore()))
        return {"data": restored["data"], "meta": dict(restored["meta"])}
    finally:
        manager.close()


def test_checkpoint_holds_the_data_iterator_position(keep_min_run):
    trainer, _, run_dir = keep_min_run
    items = _read_items(run_dir, 25)
    assert items["meta"]["signature"][".params['model']['head']['kernel'].value"][0] == [16, 10]
    data_state = items["data"]
    assert data_state, "the checkpoint holds no data iterator state"
    cfg = trainer.cfg

    def fresh():
        return train_iterator(trainer.train_split, global_batch=cfg.train.batch_size, host=trainer.host,
                              seed=cfg.seed, shuffle=cfg.loader.shuffle)

    # a fresh iterator set to the state saved at step 25 yields global batch 25 (0-based): the batch an
    # uninterrupted iterator yields after 25 batches
    uninterrupted = fresh()
    for _ in range(25):
        next(uninterrupted)
    expected = [next(uninterrupted) for _ in range(3)]
    resumed = fresh()
    resumed.set_state(data_state)
    by_index = train_dataset(trainer.train_split, global_batch=cfg.train.batch_size, host=trainer.host,
                             seed=cfg.seed, shuffle=cfg.loader.shuffle)
    for offset, batch in enumerate(expected):
        got = next(resumed)
        assert got.keys() == batch.keys()
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
            np.testing.assert_array_equal(by_index[25 + offset][key], batch[key])
    # and it is not simply the first batch again
    assert not np.array_equal(expected[0]["label"], next(fresh())["label"])


@pytest.fixture
def wide_run_dir(keep_min_run, tmp_path) -> Path:
    """A copy of a run directory whose checkpoints were written by ``model.widths=[8,16]``."""
    run_dir = tmp_path / "existing"
    shutil.copytree(keep_min_run[2] / "checkpoints", run_dir / "checkpoints")
    return run_dir


MISMATCH = "['model']['convs'][1]['kernel']"


def test_resuming_with_settings_that_change_the_run_is_refused_naming_them(wide_run_dir):
    trainer = Trainer(compose([*KEEP_RUN, "seed=7", "optimizer.lr=0.5", "train.log_every=3"]), wide_run_dir)
    with pytest.raises(ConfigError) as info:
        trainer.fit()
    message = str(info.value)
    assert f"the checkpoint at step 30 in {wide_run_dir / 'checkpoints'} was trained with other settings" in message
    assert "optimizer.lr: 0.003 -> 0.5" in message and "seed: 0 -> 7" in message
    assert "log_every" not in message and "checkpoint.resume_changed=true" in message  # logging is not the run
    forced = Trainer(compose([*KEEP_RUN, "seed=7", "checkpoint.resume_changed=true"]), wide_run_dir).fit()
    assert forced["status"] == "completed" and forced["steps"] == 30

    # a field the schema gained after the checkpoint was written does not count as a change
    from omegaconf import OmegaConf

    same = Trainer(compose(KEEP_RUN), wide_run_dir / "other")
    saved = OmegaConf.to_container(same.cfg, resolve=True)
    del saved["model"]["dropout"]
    same._check_same_run(30, saved)  # no error
    saved["model"]["widths"] = [8, 99]
    with pytest.raises(ConfigError, match=r"model\.widths: \[8, 99\] -> \[8, 16\]"):
        same._check_same_run(30, saved)


def test_incompatible_checkpoint_is_refused_naming_the_tensor(wide_run_dir):
    trainer = Trainer(compose([*KEEP_RUN, "model.widths=[8,32]"]), wide_run_dir)
    with pytest.raises(CheckpointError) as info:
        trainer.fit()
    message = str(info.value)
    assert MISMATCH in message
    assert "(3, 3, 8, 16) in the checkpoint" in message and "expected (3, 3, 8, 32)" in message
    assert str(wide_run_dir / "checkpoints") in message


def test_incompatible_checkpoint_cli_exits_2(wide_run_dir, keep_min_run, cache_env):
    """Refused over a finished run: the run's result.json and .hydra/ stay as they were; the attempt's own
    record (its result.json and the .hydra/ Hydra wrote for it) goes to attempts/<time>-<pid>/."""
    shutil.copy(keep_min_run[2] / "result.json", wide_run_dir / "result.json")
    (wide_run_dir / ".hydra").mkdir()
    (wide_run_dir / ".hydra" / "config.yaml").write_text("model:\n  widths: [8, 16]  # the finished run's\n")
    finished = {p.name: p.read_bytes() for p in (wide_run_dir / "result.json", wide_run_dir / ".hydra" / "config.yaml")}
    proc = run_prism("train", *KEEP_RUN, "model.widths=[8,32]", f"hydra.run.dir={wide_run_dir}", cwd=REPO,
                     env=cache_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "prism: error:" in proc.stderr
    assert MISMATCH in proc.stderr and "expected (3, 3, 8, 32)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (wide_run_dir / "result.json").read_bytes() == finished["result.json"]
    assert (wide_run_dir / ".hydra" / "config.yaml").read_bytes() == finished["config.yaml"]
    [attempt] = list((wide_run_dir / "attempts").iterdir())
    assert f"this attempt's record is {attempt}" in proc.stderr
    assert read_result(attempt)["status"] == "failed" and MISMATCH in read_result(attempt)["error"]
    assert "- 32" in (attempt / ".hydra" / "config.yaml").read_text()  # the refused config, kept beside


def test_a_second_train_into_a_live_run_directory_stops_at_once(tmp_path, cache_env):
    """While a process holds the run directory, ``prism train`` into it exits 1 naming the holder, and writes
    nothing there; once the holder is gone (its lock dies with it, kill -9 included) the same command trains."""
    run_dir = tmp_path / "run"
    args = [*FAST, "train.steps=2", "logging.tensorboard=false", "logging.plots=false", f"hydra.run.dir={run_dir}"]
    hold = ("import sys, time; from prism.framework.rundir import RunDirectoryLock; "
            "lock = RunDirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_prism("train", *args, cwd=REPO, env=cache_env)
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert f"run directory {run_dir} is in use by another prism process (PID {holder.pid})" in refused.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [".prism.lock"]  # no .hydra/, no result.json
    finally:
        holder.kill()
        holder.wait()
    done = run_prism("train", *args, cwd=REPO, env=cache_env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_result(run_dir)["status"] == "completed"


def test_saves_between_evaluations_keep_the_latest_without_orbax_warnings(tmp_path, caplog):
    """``checkpoint.every`` off the evaluation cadence: the in-between saves are kept as the latest (not ranked),
    the best stays an evaluated step, and orbax's 'did not provide metrics' warning (once per save) is gone."""
    import logging

    from prism.framework.checkpoint import TRACKED_METRIC_NOTICE

    with caplog.at_level(logging.WARNING, logger="absl"):
        result = Trainer(compose([*FAST, "checkpoint.every=7", "checkpoint.keep=2", "logging.tensorboard=false",
                                  "logging.plots=false"]), tmp_path).fit()
    assert not [r for r in caplog.records if r.msg == TRACKED_METRIC_NOTICE]
    # saves at 7, 14 and 20; only the last coincides with an evaluation, so it is the one ranked
    assert _steps(tmp_path / "checkpoints")[-2:] == [14, 20] and result["best_step"] == 20
