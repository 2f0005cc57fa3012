"""Device-resident data (``loader.placement``): each split decoded once and kept in device memory.

A :class:`ResidentSplit` stacks a split's examples (uint8 images at the dataset's size, labels, any
other fixed-shape fields) into one array per key and puts them on every device of the mesh, replicated.
A batch is then a gather on the device (``jnp.take`` by example index) instead of a host read, decode,
collate and host-to-device copy every step; only the batch's example indices (a few hundred int32) go
from host to device.

The indices come from the training order the host path reads too (:class:`prism.framework.order.TrainOrder`),
so both placements see the same permutation, a pure function of (seed, epoch): ``host`` and ``device`` give
the same losses, and the index stream's position in the checkpoint resumes the exact order after a kill.
Several steps' indices go to the devices at once (:meth:`ResidentSplit.step_indices`) for a call that runs
those steps with the gather inside (:func:`prism.framework.steps.multi_step`).

Replicated rather than sharded over the data axis: every device gathers any example without
communication, at the cost of one copy of the split per device (``loader.device_memory_fraction``
bounds it). Each process puts its own copy on its local devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prism.framework import parallel
from prism.framework.api import StackableSplit
from prism.framework.augment import EXAMPLE_INDEX_KEY
from prism.framework.data import VALID_KEY, as_numpy, check_split, check_train_split, read_threads, to_iter
from prism.framework.errors import DataError
from prism.framework.order import IndexStream, TrainOrder
from prism.framework.parallel import HostSlice

INDEX_KEY = "index"
#: Examples read per host batch while stacking a split (read by ``threads`` grain threads).
_STACK_BATCH = 1024


def stack_split(split: Sequence, *, threads: int = 2, what: str = "training") -> dict[str, np.ndarray]:
    """Every example of ``split`` as one array per key (from the split itself when it is a
    :class:`~prism.framework.api.StackableSplit`); :class:`~prism.framework.errors.DataError` when the
    examples' shapes differ (such data stays on the host path)."""
    check_split(split, what)
    threads = read_threads(threads)  # -1: one per core
    if isinstance(split, StackableSplit):
        return split.stacked(threads=threads)
    return stack_examples(split, threads=threads, what=what)


def stack_examples(split: Sequence, *, threads: int = 2, what: str = "training") -> dict[str, np.ndarray]:
    """:func:`stack_split` by reading every example (grain, ``threads`` reader threads)."""
    ds = grain.MapDataset.source(split).map(as_numpy)
    try:
        batches = list(to_iter(ds.batch(_STACK_BATCH), workers=0, threads=threads, prefetch=max(threads, 2)))
    except ValueError as error:  # grain's collate: arrays of different shapes cannot be stacked
        raise DataError(f"the {what} split's examples do not all have one shape, so it cannot be kept on the "
                        f"device (loader.placement=device); use loader.placement=host ({error})") from None
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def fixed_shape_bytes(split: Sequence) -> int | None:
    """Bytes of ``split`` stacked, estimated from its first example; None when it is empty."""
    if len(split) == 0:
        return None
    first = as_numpy(split[0])
    return len(split) * sum(v.nbytes for v in first.values())


def device_memory_bytes() -> int | None:
    """The memory of one local device, when its backend reports it (GPUs and TPUs do; the CPU does not)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit else None


def choose_placement(placement: str, splits: Sequence[Sequence], fraction: float) -> str:
    """``host`` or ``device`` for ``loader.placement``: ``auto`` is ``device`` when the backend reports its
    memory and the splits' decoded examples fit in ``fraction`` of one device's memory."""
    if placement != "auto":
        return placement
    memory = device_memory_bytes()
    sizes = [fixed_shape_bytes(s) for s in splits]
    if memory is None or any(size is None for size in sizes):
        return "host"
    return "device" if sum(sizes) <= fraction * memory else "host"


class ResidentSplit:
    """A split kept on the devices; :meth:`batch` gathers a global batch by example index."""

    def __init__(self, split: Sequence, mesh: Mesh, *, threads: int = 2, what: str = "training") -> None:
        self.mesh, self.length = mesh, len(split)
        host_arrays = stack_split(split, threads=threads, what=what)
        replicated = parallel.replicated(mesh)
        self.arrays = {k: jax.make_array_from_process_local_data(replicated, v) for k, v in host_arrays.items()}
        self.nbytes = sum(v.nbytes for v in host_arrays.values())
        self._gather = jax.jit(lambda arrays, index: {k: jnp.take(v, index, axis=0) for k, v in arrays.items()},
                               out_shardings=parallel.batch_sharding(mesh))

    def batch(self, host_indices: np.ndarray) -> dict[str, jax.Array]:
        """The global batch whose examples are this host's ``host_indices`` (and the other hosts' own)."""
        index = parallel.global_batch(self.mesh, {INDEX_KEY: np.asarray(host_indices, np.int32)})[INDEX_KEY]
        return {**self._gather(self.arrays, index), EXAMPLE_INDEX_KEY: index}

    def step_indices(self, host_indices: np.ndarray) -> jax.Array:
        """``[steps, global batch]`` example indices, sharded as the batches they select, from this host's
        ``[steps, per-host batch]`` block (and the other hosts' own)."""
        return jax.make_array_from_process_local_data(parallel.steps_batch_sharding(self.mesh),
                                                      np.asarray(host_indices, np.int32))

    def eval_indices(self, *, global_batch: int, host: HostSlice, max_batches: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``(example indices, validity)``, both ``[batches, per-host batch]``: this host's part of every global
        evaluation batch over the split in order, the last one padded with the first example (as
        :func:`prism.framework.data.eval_batches` does on the host)."""
        n_batches = -(-self.length // global_batch)
        if max_batches:
            n_batches = min(n_batches, max_batches)
        starts = np.arange(n_batches)[:, None] * global_batch + host.index * host.per_host_batch
        index = starts + np.arange(host.per_host_batch)
        valid = index < self.length
        return np.where(valid, index, 0).astype(np.int32), valid

    def eval_batches(self, *, global_batch: int, host: HostSlice, max_batches: int = 0
                     ) -> Iterator[tuple[dict[str, jax.Array], np.ndarray]]:
        """``(global batch, this host's validity mask)`` of :meth:`eval_indices`, one batch at a time."""
        indices, valid = self.eval_indices(global_batch=global_batch, host=host, max_batches=max_batches)
        for batch_indices, batch_valid in zip(indices, valid, strict=True):
            yield self.batch(batch_indices), batch_valid


def train_index_stream(split: Sequence, *, global_batch: int, host: HostSlice, seed: int,
                       shuffle: bool = True) -> IndexStream:
    """The host path's training order over example indices: ``next()`` is this host's part of the next global
    batch (checkpointable like the host path's iterator)."""
    check_train_split(split, global_batch)
    return IndexStream(TrainOrder(len(split), global_batch=global_batch, host=host, seed=seed, shuffle=shuffle))


__all__ = ["INDEX_KEY", "VALID_KEY", "ResidentSplit", "choose_placement", "stack_examples", "stack_split",
           "train_index_stream"]
