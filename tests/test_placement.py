"""``loader.placement``: device-resident data gives the host path's numbers, and ``auto`` picks sensibly.

Both placements read the same training order (:class:`prism.framework.order.TrainOrder`; on ``device`` as
example indices), so the same config must log the same losses step by step and end with the same evaluation,
whose last batch is padded. Several steps per call (``train.steps_per_call``) run the same steps inside one
program: the same numbers up to float rounding (XLA may fuse a loop body's reductions differently).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FAST

from prism.framework import resident
from prism.framework.config import compose
from prism.framework.errors import DataError
from prism.framework.logging import read_metrics
from prism.framework.order import IndexStream, TrainOrder
from prism.framework.parallel import HostSlice
from prism.framework.train import Trainer

#: eval batch 56 does not divide the digits evaluation split: the last device batch is padded.
#: the alternating flip reads each example's index and epoch: both paths must hand over the same ones.
RUN = [*FAST, "train.log_every=1", "train.eval_batch_size=56", "checkpoint.enabled=false", "logging.plots=false",
       "logging.tensorboard=false", "augment.ops=[{name:hflip,alternate:true}]"]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    runs = {}
    variants = {"host": ["loader.placement=host"], "device": ["loader.placement=device", "train.steps_per_call=1"],
                "calls": ["loader.placement=device", "train.steps_per_call=6"]}
    for name, overrides in variants.items():
        run_dir = tmp_path_factory.mktemp(name)
        trainer = Trainer(compose([*RUN, *overrides]), run_dir)
        runs[name] = (trainer, trainer.fit(), run_dir)
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


def test_several_steps_per_call_log_every_step_with_the_same_numbers(both):
    (host, host_result, host_dir), (calls, calls_result, calls_dir) = both["host"], both["calls"]
    assert calls.programs.steps_per_call == 6 and host.programs.steps_per_call == 1
    ends, step = [], 0
    while step < 20:
        step += calls._call_length(step)
        ends.append(step)
    assert calls.eval_every == 10 and ends == [6, 10, 16, 20]  # a call ends at every evaluation
    losses, call_losses = _losses(host_dir), _losses(calls_dir)
    assert sorted(call_losses) == list(range(1, 21))  # every step logged from the calls' stacked metrics
    np.testing.assert_allclose([call_losses[s] for s in range(1, 21)], [losses[s] for s in range(1, 21)], rtol=1e-5)
    assert calls_result["steps"] == host_result["steps"] == 20
    assert calls_result["metrics"]["eval/accuracy"] == pytest.approx(host_result["metrics"]["eval/accuracy"],
                                                                     abs=1 / len(host.eval_split))
    np.testing.assert_allclose(np.asarray(calls.state.params["model"]["head"]["kernel"].value),
                               np.asarray(host.state.params["model"]["head"]["kernel"].value), rtol=1e-4, atol=1e-6)


def test_train_order_is_a_pure_function_of_seed_and_epoch():
    one = TrainOrder(10, global_batch=4, host=HostSlice(0, 1, 4), seed=3)
    stream = one.host_batches(0, 5).ravel()  # 20 elements: two epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert list(stream[:10]) != list(stream[10:])  # a new permutation each epoch
    hosts = [TrainOrder(10, global_batch=4, host=HostSlice(i, 2, 2), seed=3).host_batches(0, 5) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate(hosts, axis=1).ravel(), stream)  # each host its block
    again = IndexStream(TrainOrder(10, global_batch=4, host=HostSlice(0, 1, 4), seed=3))
    next(again), next(again)
    resumed = IndexStream(TrainOrder(10, global_batch=4, host=HostSlice(0, 1, 4), seed=3))
    resumed.set_state(again.get_state())
    np.testing.assert_array_equal(resumed.take(3), again.take(3))
    np.testing.assert_array_equal(resumed.order.host_batches(0, 5).ravel(), stream)
    unshuffled = TrainOrder(10, global_batch=4, host=HostSlice(0, 1, 4), seed=3, shuffle=False)
    assert list(unshuffled.host_batches(0, 3).ravel()) == [*range(10), 0, 1]


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


def test_a_tfds_split_keeps_its_decoded_copy_for_the_next_run(tmp_path):
    from prism.framework.optim import plugin_config
    from prism.framework.registry import DATASETS

    def train_split():
        cfg = compose(["dataset=digits", "dataset.cache=false", f"dataset.data_dir={tmp_path}"])
        return DATASETS.get("digits").builder(plugin_config(cfg.dataset)).split(cfg.dataset.train_split)

    split = train_split()
    read = resident.stack_examples(split)
    assert split.cache_dir is not None and not split.cache_dir.exists()
    first = resident.stack_split(split)  # read example by example, then kept
    assert (split.cache_dir / "meta.json").is_file()
    assert set(first) == set(read) == {"image", "label"}
    for key in read:
        np.testing.assert_array_equal(first[key], read[key])
    np.save(split.cache_dir / "label.npy", read["label"][::-1])  # marks the copy: the next read must be it
    again = resident.stack_split(train_split())
    np.testing.assert_array_equal(again["label"], read["label"][::-1])
    np.testing.assert_array_equal(again["image"], read["image"])
