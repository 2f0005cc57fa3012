"""Host input pipeline: a random-access data source -> grain -> this host's slice of each global batch.

The training stream is :class:`~prism.framework.order.TrainOrder`'s (a new permutation every epoch) cut
into global batches; global batch ``s`` holds stream elements ``[s*B, (s+1)*B)`` whatever the number of
hosts, and each host loads its contiguous block of it. The pipeline is therefore a pure function of
(seed, step), the same as the device path's (``loader.placement=device``): the grain iterator state saved
in checkpoints restores the exact position.

Evaluation walks a split once, in order, padding the last global batch with copies of the first
example and a ``_valid`` mask so that no example is dropped or counted twice.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from prism.framework.augment import EXAMPLE_INDEX_KEY
from prism.framework.errors import DataError
from prism.framework.order import TrainOrder
from prism.framework.parallel import HostSlice

VALID_KEY = "_valid"


def as_numpy(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in example.items()}


def check_split(split: Sequence, what: str) -> None:
    if len(split) == 0:
        raise DataError(f"the {what} split is empty: check dataset.train_split / dataset.eval_split")


def _enable_grain_workers() -> None:
    """grain's worker processes read absl flags; mark them parsed when not running under absl.app."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


#: The most read threads ``loader.threads=-1`` gives (beyond this grain's reads stop scaling on a GPU host).
MAX_AUTO_THREADS = 16


def read_threads(asked: int) -> int:
    """``loader.threads``: as asked, or for -1 one thread per core of this machine (at most MAX_AUTO_THREADS)."""
    if asked >= 0:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(cores, MAX_AUTO_THREADS))


def to_iter(ds: grain.MapDataset, *, workers: int, threads: int, prefetch: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads(threads), prefetch_buffer_size=prefetch))
    if workers > 0:
        _enable_grain_workers()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


class _Stream:
    """The training stream as a random-access source: element ``e`` is the example ``order`` puts there."""

    def __init__(self, split: Sequence, order: TrainOrder) -> None:
        self.split, self.order = split, order

    def __len__(self) -> int:
        return sys.maxsize  # infinite, as grain's repeat()

    def __getitem__(self, element: int) -> dict[str, np.ndarray]:
        index = self.order.example(element)
        return {**as_numpy(self.split[index]), EXAMPLE_INDEX_KEY: np.asarray(index, np.int32)}


def check_train_split(split: Sequence, global_batch: int) -> None:
    check_split(split, "training")
    if len(split) < global_batch:
        raise DataError(
            f"the training split has {len(split)} examples, fewer than one global batch ({global_batch}); "
            f"lower train.batch_size"
        )


def train_dataset(
    split: Sequence, *, global_batch: int, host: HostSlice, seed: int, shuffle: bool = True
) -> grain.MapDataset:
    """Infinite map dataset whose element ``s`` is this host's part of global batch ``s``."""
    check_train_split(split, global_batch)
    order = TrainOrder(len(split), global_batch=global_batch, host=host, seed=seed, shuffle=shuffle)
    ds = grain.MapDataset.source(_Stream(split, order))
    ds = ds.batch(host.per_host_batch, drop_remainder=True)
    return ds[host.index :: host.count]


def train_iterator(
    split: Sequence, *, global_batch: int, host: HostSlice, seed: int, shuffle: bool = True,
    workers: int = 0, threads: int = 2, prefetch: int = 2,
) -> grain.DatasetIterator:
    """A checkpointable iterator over :func:`train_dataset` (``get_state``/``set_state``)."""
    ds = train_dataset(split, global_batch=global_batch, host=host, seed=seed, shuffle=shuffle)
    return iter(to_iter(ds, workers=workers, threads=threads, prefetch=prefetch))


class _PaddedExamples:
    """Random access to a split padded to ``length`` examples, with a validity flag."""

    def __init__(self, split: Sequence, length: int) -> None:
        self.split, self.length = split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        valid = index < len(self.split)
        example = as_numpy(self.split[index if valid else 0])
        example[VALID_KEY] = np.asarray(valid)
        return example


def eval_batches(
    split: Sequence, *, global_batch: int, host: HostSlice, max_batches: int = 0, threads: int = 2,
    prefetch: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's part of each global evaluation batch over the whole split, in order, padded."""
    check_split(split, "evaluation")
    n_batches = -(-len(split) // global_batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    ds = grain.MapDataset.source(_PaddedExamples(split, n_batches * global_batch))
    ds = ds.batch(host.per_host_batch, drop_remainder=True)[host.index :: host.count]
    return iter(to_iter(ds, workers=0, threads=threads, prefetch=prefetch))
