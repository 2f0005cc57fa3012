"""Reading many image files on every core while a folder dataset is prepared.

Preparing a folder reads every file twice (its header while scanning, then the whole image, decoded once to
catch corrupt files); PIL's JPEG parsing is Python and holds the GIL, ~0.5 ms a file. :func:`map_ordered`
spreads that over worker processes, in order and with a bounded number of chunks in flight, so the TFDS
writer still receives the examples one by one in the source order. Workers are spawned (never forked: the
parent runs JAX's threads) and import only this module (PIL and NumPy, no TFDS) and not the parent's
``__main__``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: What PIL raises for a file it cannot read as an image.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
#: Files per task; fewer files than two chunks are read in this process.
CHUNK = 256


def image_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def read_header(path: Path) -> tuple[tuple[int, int], str]:
    """``((height, width), PIL mode)`` from the file header, without decoding the pixels."""
    with Image.open(path) as im:
        return (im.height, im.width), im.mode


def encoded_image(path: Path, channels: int) -> tuple[bytes, tuple[int, int]]:
    """Decode ``path`` fully (so corrupt files are caught here) and return the bytes to store with its
    (height, width): the file itself when it is a JPEG/PNG already in the wanted mode, else a PNG."""
    mode = image_mode(channels)
    with Image.open(path) as im:
        im.load()
        if im.format in ("JPEG", "PNG") and im.mode == mode:
            return Path(path).read_bytes(), (im.height, im.width)
        from prism.plugins.datasets.tfds_source import png_bytes  # TFDS only for the rare conversion

        return png_bytes(np.asarray(im.convert(mode))), (im.height, im.width)


def _apply(fn: Callable, items: Sequence) -> list[tuple[bool, Any]]:
    """``(True, fn(item))``, or ``(False, the DECODE_ERRORS exception)`` for each item."""
    out = []
    for item in items:
        try:
            out.append((True, fn(item)))
        except DECODE_ERRORS as exc:
            out.append((False, exc))
    return out


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawned workers import the parent's ``__main__`` first; a user's script without an
    ``if __name__ == "__main__":`` guard would then run again in each. The workers need nothing from it (they
    run this module's functions), so it is hidden from multiprocessing while they start."""
    main = sys.modules["__main__"]
    saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


def map_ordered(fn: Callable, items: Sequence, *, workers: int | None = None, chunk: int = CHUNK
                ) -> Iterator[tuple[bool, Any]]:
    """:func:`_apply`'s ``(ok, value or error)`` for every item, in order; ``fn`` must be picklable (a
    module-level function, or a ``functools.partial`` of one). At most two chunks per worker are in flight,
    so memory stays bounded whatever the number of files."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(items) < 2 * chunk:
        yield from _apply(fn, items)
        return
    starts = iter(range(0, len(items), chunk))
    with _main_module_hidden():  # the pool starts its processes here, all at once
        pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pending: deque = deque()
        for start in starts:
            pending.append(pool.apply_async(_apply, (fn, items[start:start + chunk])))
            if len(pending) >= 2 * workers:
                break
        while pending:
            results = pending.popleft().get()
            start = next(starts, None)
            if start is not None:
                pending.append(pool.apply_async(_apply, (fn, items[start:start + chunk])))
            yield from results
    finally:
        pool.terminate()
        pool.join()


def headers(paths: Sequence[Path], *, workers: int | None = None) -> Iterator[tuple[bool, Any]]:
    """:func:`read_header` of every path, in order, on ``workers`` processes."""
    return map_ordered(read_header, list(paths), workers=workers)


def encoded_images(paths: Sequence[Path], channels: int, *, workers: int | None = None
                   ) -> Iterator[tuple[bool, Any]]:
    """:func:`encoded_image` of every path, in order, on ``workers`` processes."""
    return map_ordered(partial(encoded_image, channels=channels), list(paths), workers=workers)
