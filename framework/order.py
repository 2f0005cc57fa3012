"""The training order: which examples each global batch holds, a pure function of (seed, step).

The training stream is every epoch's permutation of the split, one after the other: stream element ``e`` is
example ``permutation(seed, e // n)[e % n]`` of a split of ``n`` examples. Global batch ``s`` (0-based)
holds elements ``[s*B, (s+1)*B)`` whatever the number of hosts, and each host reads its contiguous block.

Both placements read this one order: the host pipeline (:func:`prism.framework.data.train_dataset`) maps
stream elements to examples through it, and the device path (``loader.placement=device``) takes the
batches' example indices from :class:`IndexStream`, computed with NumPy for a whole call at once
(grain's per-element pipeline spent ~40 ms on the indices of one 1024-example batch, longer than the
step it fed). Epoch permutations are NumPy's (``default_rng([seed, epoch]).permutation``), so an epoch
needs no other state than its number, and a resumed run continues the exact order.
"""

from __future__ import annotations

import numpy as np

from prism.framework.parallel import HostSlice

#: Epoch permutations kept in memory (a batch spans at most two epochs; a call of many steps a few more).
_CACHED_EPOCHS = 4


class TrainOrder:
    """Example indices of the training stream of a split of ``length`` examples."""

    def __init__(self, length: int, *, global_batch: int, host: HostSlice, seed: int, shuffle: bool = True) -> None:
        self.length, self.global_batch, self.host = length, global_batch, host
        self.seed, self.shuffle = seed, shuffle
        self._permutations: dict[int, np.ndarray] = {}  # insertion-ordered: the oldest first

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the split's examples in ``epoch`` (the identity without shuffling)."""
        order = self._permutations.get(epoch)
        if order is None:  # grain's reader threads may race here: both compute the same array
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.length).astype(np.int32)
            else:
                order = np.arange(self.length, dtype=np.int32)
            self._permutations[epoch] = order
            while len(self._permutations) > _CACHED_EPOCHS:
                self._permutations.pop(next(iter(self._permutations)), None)
        return order

    def example(self, element: int) -> int:
        """The example index of stream element ``element``."""
        epoch, position = divmod(int(element), self.length)
        return int(self.permutation(epoch)[position])

    def examples(self, elements: np.ndarray) -> np.ndarray:
        """The example index of each stream element in ``elements`` (any shape)."""
        elements = np.asarray(elements, np.int64)
        epochs, positions = np.divmod(elements, self.length)
        out = np.empty(elements.shape, np.int32)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.permutation(int(epoch))[positions[where]]
        return out

    def host_batches(self, start: int, count: int) -> np.ndarray:
        """This host's example indices of global batches ``start .. start+count-1``: ``[count, per_host]``."""
        per_host = self.host.per_host_batch
        first = np.arange(start, start + count, dtype=np.int64)[:, None] * self.global_batch
        return self.examples(first + self.host.index * per_host + np.arange(per_host))


class IndexStream:
    """A checkpointable iterator over :class:`TrainOrder`'s batches (``get_state``/``set_state``, as grain's
    iterators): ``next()`` is this host's indices of the next global batch, :meth:`take` those of several."""

    def __init__(self, order: TrainOrder) -> None:
        self.order, self.position = order, 0

    def __iter__(self) -> IndexStream:
        return self

    def __next__(self) -> np.ndarray:
        return self.take(1)[0]

    def take(self, count: int) -> np.ndarray:
        batches = self.order.host_batches(self.position, count)
        self.position += count
        return batches

    def get_state(self) -> dict:
        return {"next_batch": self.position}

    def set_state(self, state: dict) -> None:
        self.position = int(state["next_batch"])


__all__ = ["IndexStream", "TrainOrder"]
