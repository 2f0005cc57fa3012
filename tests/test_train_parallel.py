"""Data parallelism: the same run on 1 and 4 devices computes the same numbers; batch and parameter
shardings; FSDP; batch divisibility; the per-host split of each global batch.

The in-process runs use the 4 simulated CPU devices of ``conftest``; the 1-device run is a subprocess
with ``--xla_force_host_platform_device_count=1`` (the device count is fixed once JAX starts).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
import pytest
from conftest import FAST, REPO, read_result, run_prism
from flax import nnx

from prism.framework import parallel
from prism.framework.config import compose
from prism.framework.data import train_dataset
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm
from prism.framework.logging import read_metrics
from prism.framework.parallel import HostSlice
from prism.framework.train import Trainer

#: Identical numbers on every device count: log every step, shuffled data, dropout left at its default
#: (0.1; with partitionable threefry the dropout mask does not depend on how the batch is sharded).
PARALLEL_RUN = [*FAST, "train.log_every=1", "loader.shuffle=true", "logging.tensorboard=false",
                "logging.plots=false", "checkpoint.enabled=false"]
RTOL = 1e-4


def _series(run_dir, name: str) -> dict[int, float]:
    return {r["step"]: r[name] for r in read_metrics(run_dir) if name in r}


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """The reference run on the 4-device ``(data=4, fsdp=1)`` mesh, in process."""
    run_dir = tmp_path_factory.mktemp("four_devices")
    trainer = Trainer(compose(PARALLEL_RUN), run_dir)
    result = trainer.fit()
    return trainer, result, run_dir


def test_one_device_and_four_devices_compute_the_same_run(four_devices, tmp_path):
    _, result4, dir4 = four_devices
    dir1 = tmp_path / "one_device"
    proc = run_prism("train", *PARALLEL_RUN, f"hydra.run.dir={dir1}", cwd=REPO,
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result1 = read_result(dir1)
    assert (result1["devices"], result4["devices"]) == (1, 4)

    loss1, loss4 = _series(dir1, "train/loss"), _series(dir4, "train/loss")
    assert sorted(loss1) == sorted(loss4) == list(range(1, 21))
    np.testing.assert_allclose([loss1[s] for s in sorted(loss1)], [loss4[s] for s in sorted(loss4)], rtol=RTOL)
    # the losses move (the comparison is not between two constant series)
    assert np.ptp(list(loss4.values())) > 1e-2

    for name in ("eval/accuracy", "eval/loss", "eval/top5"):
        ev1, ev4 = _series(dir1, name), _series(dir4, name)
        assert sorted(ev1) == sorted(ev4) == [10, 20]
        np.testing.assert_allclose([ev1[s] for s in (10, 20)], [ev4[s] for s in (10, 20)], rtol=RTOL, atol=1e-6)
    assert result1["metrics"].keys() == result4["metrics"].keys()
    for name, value in result4["metrics"].items():
        np.testing.assert_allclose(result1["metrics"][name], value, rtol=RTOL, atol=1e-6)


def test_global_batch_is_sharded_over_every_device(four_devices):
    trainer = four_devices[0]
    assert dict(trainer.mesh.shape) == {"data": 4, "fsdp": 1}
    host = {"image": np.arange(32 * 8 * 8, dtype=np.uint8).reshape(32, 8, 8, 1),
            "label": np.arange(32, dtype=np.int32)}
    batch = parallel.global_batch(trainer.mesh, host)
    for name, array in batch.items():
        assert isinstance(array, jax.Array)
        assert array.shape == host[name].shape
        assert len(array.sharding.device_set) == 4
        assert not array.sharding.is_fully_replicated
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape[0] for s in shards] == [8, 8, 8, 8]
        assert len({s.device for s in shards}) == 4
        np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), host[name])


def test_params_and_optimizer_state_are_replicated_by_default(four_devices):
    trainer = four_devices[0]
    for leaf in jax.tree.leaves(trainer.state):  # after training: the step keeps the shardings
        assert leaf.sharding.is_fully_replicated, leaf.sharding
        assert len(leaf.sharding.device_set) == 4


def test_fsdp_shards_kernels_and_trains_like_data_parallel(four_devices, tmp_path):
    _, _, dir4 = four_devices
    trainer = Trainer(compose([*PARALLEL_RUN, "parallel.fsdp=2"]), tmp_path / "fsdp")
    trainer.fit()
    assert dict(trainer.mesh.shape) == {"data": 2, "fsdp": 2}

    params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(trainer.state.params)[0]}
    kernel = next(x for p, x in params.items() if "convs'][1]['kernel" in p)
    assert kernel.shape == (3, 3, 8, 16)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert not kernel.sharding.is_fully_replicated
    assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 8, 8)}
    head = next(x for p, x in params.items() if "head']['kernel" in p)
    assert head.shape == (16, 10) and head.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    # the optimizer moments follow their parameters
    mu = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.shape == (3, 3, 8, 16)]
    assert mu and all(m.sharding.spec == kernel.sharding.spec for m in mu)

    loss_fsdp, loss_dp = _series(tmp_path / "fsdp", "train/loss"), _series(dir4, "train/loss")
    assert sorted(loss_fsdp) == sorted(loss_dp)
    np.testing.assert_allclose([loss_fsdp[s] for s in sorted(loss_fsdp)], [loss_dp[s] for s in sorted(loss_dp)],
                               rtol=RTOL)
    np.testing.assert_allclose(_series(tmp_path / "fsdp", "eval/loss")[20], _series(dir4, "eval/loss")[20],
                               rtol=RTOL)


def _all_reduces(trainer: Trainer) -> int:
    host = {"image": np.zeros((32, 8, 8, 1), np.uint8), "label": np.zeros(32, np.int32)}
    batch = parallel.global_batch(trainer.mesh, host)
    return trainer.programs.step.lower(trainer.state, batch).compile().as_text().count(" all-reduce(")


def test_per_device_batch_stats_take_each_devices_shard_and_skip_the_syncs(four_devices, tmp_path):
    trainer4, _, dir4 = four_devices
    trainer = Trainer(compose([*PARALLEL_RUN, "parallel.batch_stats=per_device", "train.steps=3"]),
                      tmp_path / "per_device")
    system = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.rest, copy=True)
    layers = [m for _, m in nnx.iter_modules(system) if isinstance(m, BatchNorm)]
    assert len(layers) == 2 and {m.stat_groups for m in layers} == {4}
    # the step's program loses the all-reduce of every BatchNorm's statistics (forward and backward)
    assert _all_reduces(trainer) < _all_reduces(trainer4)
    trainer.fit()
    # statistics of 8 images per device instead of 32: the first step's loss differs from the global run's
    first, first_global = _series(tmp_path / "per_device", "train/loss")[1], _series(dir4, "train/loss")[1]
    assert np.isfinite(first) and first != pytest.approx(first_global, rel=1e-4)


@pytest.mark.parametrize("override", ["train.batch_size=30", "train.eval_batch_size=30"])
def test_batch_not_divisible_by_devices_is_a_config_error(override, tmp_path):
    with pytest.raises(ConfigError, match="divisible") as info:
        Trainer(compose([*FAST, override]), tmp_path / "run")
    assert "30" in str(info.value) and "4" in str(info.value)


def test_fsdp_not_dividing_the_devices_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="parallel.fsdp=3"):
        Trainer(compose([*FAST, "parallel.fsdp=3"]), tmp_path / "run")


class _Indexed(Sequence):
    """A split whose examples carry their own index, to identify them in batches."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"index": np.asarray(i, np.int64), "image": np.full((2, 2, 1), i % 251, np.uint8)}


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_hosts_split_each_global_batch_without_overlap(shuffle):
    split, batch, seed = _Indexed(100), 16, 3
    one = train_dataset(split, global_batch=batch, host=HostSlice(0, 1, batch), seed=seed, shuffle=shuffle)
    hosts = [train_dataset(split, global_batch=batch, host=HostSlice(i, 2, batch // 2), seed=seed, shuffle=shuffle)
             for i in range(2)]
    per_epoch = len(split) // batch  # global batches 0..5 lie inside the first epoch, 6 straddles two
    for s in [0, 1, 2, per_epoch - 1, per_epoch, per_epoch + 1, 17]:
        whole = one[s]
        parts = [h[s] for h in hosts]
        assert whole["index"].shape == (batch,)
        assert [p["index"].shape for p in parts] == [(batch // 2,), (batch // 2,)]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        if s < per_epoch:  # within one epoch every example appears at most once
            assert not set(parts[0]["index"].tolist()) & set(parts[1]["index"].tolist())
            assert len(set(whole["index"].tolist())) == batch
    # the stream: the first epoch is a permutation (shuffled or in order), the next epoch another one
    stream = np.concatenate([one[s]["index"] for s in range(2 * per_epoch + 2)])
    first, second = stream[: len(split)], stream[len(split): 2 * len(split)]
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(len(split)))
    if shuffle:
        assert not np.array_equal(first, np.arange(len(split)))
        assert not np.array_equal(first, second)
    else:
        np.testing.assert_array_equal(first, np.arange(len(split)))


def test_host_batch_slice_uses_the_global_batch_over_processes(four_devices):
    mesh = four_devices[0].mesh
    assert parallel.host_batch_slice(32, mesh) == HostSlice(0, 1, 32)
    with pytest.raises(ConfigError, match="divisible"):
        parallel.host_batch_slice(6, mesh)


def test_default_xla_flags_are_added_unless_the_user_set_them():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert parallel.apply_default_xla_flags(env) == (
        "--xla_force_host_platform_device_count=4 --xla_gpu_enable_latency_hiding_scheduler=true")
    assert parallel.apply_default_xla_flags(env) == env["XLA_FLAGS"]  # idempotent
    mine = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false"}
    assert parallel.apply_default_xla_flags(mine) == "--xla_gpu_enable_latency_hiding_scheduler=false"
    assert parallel.apply_default_xla_flags({}) == "--xla_gpu_enable_latency_hiding_scheduler=true"
