"""``loader.placement``: device-resident data gives the host path's numbers, and ``auto`` picks sensibly.

Both placements read the same grain permutation (on ``device`` over example indices), so the same config
must log the same losses step by step and end with the same evaluation, whose last batch is padded.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST

from prism.framework import resident
from prism.framework.config import compose
from prism.framework.errors import DataError
from prism.framework.logging import read_metrics
from prism.framework.train import Trainer

#: eval batch 56 does not divide the digits evaluation split: the last device batch is padded.
RUN = [*FAST, "train.log_every=1", "train.eval_batch_size=56", "checkpoint.enabled=false", "logging.plots=false",
       "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    runs = {}
    for placement in ("host", "device"):
        run_dir = tmp_path_factory.mktemp(placement)
        trainer = Trainer(compose([*RUN, f"loader.placement={placement}"]), run_dir)
        runs[placement] = (trainer, trainer.fit(), run_dir)
    return runs


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def test_host_and_device_placement_log_identical_losses(both):
    (host, host_result, host_dir), (device, device_result, device_dir) = both["host"], both["device"]
    assert host.placement == "host" and device.placement == "device"
    assert len(device.eval_split) % 56 != 0
    losses = _losses(host_dir)
    assert sorted(losses) == list(range(1, 21))
    assert _losses(device_dir) == losses
    assert device_result["metrics"] == host_result["metrics"]
    assert device_result["train_metrics"] == host_result["train_metrics"]


def test_device_placement_keeps_both_splits_on_the_devices(both):
    device = both["device"][0]
    train = device.resident(device.cfg.dataset.train_split)
    assert train.length == len(device.train_split)
    np.testing.assert_array_equal(np.asarray(train.arrays["image"][3]), device.train_split[3]["image"])
    assert set(device._resident) == {device.cfg.dataset.train_split, device.cfg.dataset.eval_split}
    assert both["host"][0]._resident == {}


def test_stacking_examples_of_different_shapes_names_the_fix():
    split = [{"image": np.zeros((4, 4, 3), np.uint8)}, {"image": np.zeros((5, 4, 3), np.uint8)}]
    with pytest.raises(DataError, match="loader.placement=host"):
        resident.stack_split(split)


def test_auto_placement(monkeypatch):
    split = [{"image": np.zeros((8, 8, 3), np.uint8), "label": np.int32(0)}] * 100  # 100 * 196 bytes
    assert resident.choose_placement("auto", [split], 0.25) == "host"  # the CPU reports no memory
    monkeypatch.setattr(resident, "device_memory_bytes", lambda: 100_000)
    assert resident.choose_placement("auto", [split], 0.25) == "device"  # 19,600 <= 25,000
    assert resident.choose_placement("auto", [split, split], 0.25) == "host"  # 39,200 > 25,000
    assert resident.choose_placement("host", [split], 0.25) == "host"
    assert resident.choose_placement("auto", [[]], 0.25) == "host"
