"""The host path's read-ahead (framework/device_prefetch.py): same batches in the same order, a checkpoint
state that counts only the batches handed out, and errors of the reading thread raised in the training thread."""

from __future__ import annotations

import grain
import numpy as np
import pytest

from prism.framework.device_prefetch import DevicePrefetcher


def _grain_iter():
    return iter(grain.MapDataset.range(20).map(lambda i: {"x": np.full(2, i)}).batch(3).to_iter_dataset())


def test_batches_and_checkpoint_state_are_those_of_the_plain_iterator():
    plain, ahead = _grain_iter(), DevicePrefetcher(_grain_iter(), put=lambda b: b["x"] * 10, depth=3)
    for _ in range(4):
        np.testing.assert_array_equal(next(ahead), next(plain)["x"] * 10)
        assert ahead.get_state() == plain.get_state()  # not the state after the batches read ahead
    resumed = _grain_iter()
    resumed.set_state(ahead.get_state())
    np.testing.assert_array_equal(next(resumed)["x"] * 10, next(ahead))
    assert [b.shape[0] for b in ahead] == [3, 2]  # the rest, then StopIteration
    with pytest.raises(RuntimeError, match="set_state after batches were read ahead"):
        ahead.set_state(plain.get_state())


def test_set_state_before_the_first_batch_resumes_there():
    source = _grain_iter()
    for _ in range(2):
        next(source)
    ahead = DevicePrefetcher(_grain_iter(), put=lambda b: b)
    ahead.set_state(source.get_state())
    np.testing.assert_array_equal(next(ahead)["x"], next(source)["x"])
    ahead.close()


def test_an_error_while_reading_ahead_is_raised_by_next():
    def put(batch):
        if batch["x"][0, 0] >= 3:
            raise ValueError("bad batch 1")
        return batch

    ahead = DevicePrefetcher(_grain_iter(), put=put)
    next(ahead)
    with pytest.raises(ValueError, match="bad batch 1"):
        next(ahead)
