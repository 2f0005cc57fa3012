"""Where prism keeps what it can recompute, and JAX's persistent compilation cache there.

Compiling is a large part of starting a run: on an H100, building a ResNet-50 Trainer (its weight-init
program) and compiling its train step took ~27 s and ~22 s, longer than 1,000 training steps' worth of
a small sweep job. The ``prism`` command therefore turns on JAX's persistent compilation cache in
``cache_dir()/jax`` (:func:`enable`): a program compiled once before, for the same shapes, constants, devices,
flags and JAX version, is loaded from disk instead of compiled. Repeated runs, evaluations, and sweep jobs
that differ only in what is not compiled into the step reuse the programs.

Settings (environment, read when the command starts):

- ``PRISM_COMPILATION_CACHE=0`` turns it off;
- ``JAX_COMPILATION_CACHE_DIR`` (JAX's own setting) wins when set, and JAX then applies it itself;
- ``PRISM_CACHE_DIR`` moves all of prism's caches (default ``$XDG_CACHE_HOME/prism`` or ``~/.cache/prism``).

The cache is capped at :data:`MAX_BYTES` (least recently used entries go first; JAX needs the ``filelock``
package for that, a prism dependency) unless ``JAX_COMPILATION_CACHE_MAX_SIZE`` says otherwise. :func:`stats`
counts what it served, from JAX's own monitoring events; runs log it and ``prism bench`` records it, so a
compile time that came from the cache is never mistaken for a compile.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import MutableMapping
from pathlib import Path

import jax

from prism.framework.errors import ConfigError

#: Environment variable that turns the cache off with ``0``/``false``/``off``/``no`` (on: ``1``/``true``/...).
SWITCH_ENV = "PRISM_COMPILATION_CACHE"
ON, OFF = ("1", "true", "on", "yes", ""), ("0", "false", "off", "no")
#: Size the cache may grow to before JAX evicts the least recently used programs.
MAX_BYTES = 8 * 2**30

log = logging.getLogger("prism")

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"
_counts = {"hits": 0, "misses": 0, "saved_s": 0.0}
_lock = threading.Lock()
_listening = False
_directory: list[Path] = []  # set by enable()


def cache_dir() -> Path:
    """Where prism caches derived data: ``$PRISM_CACHE_DIR``, else ``$XDG_CACHE_HOME/prism``, else
    ``~/.cache/prism``."""
    if os.environ.get("PRISM_CACHE_DIR"):
        return Path(os.environ["PRISM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prism"


def _on_event(event: str, **_: object) -> None:
    if event in (_HIT, _MISS):
        with _lock:
            _counts["hits" if event == _HIT else "misses"] += 1


def _on_duration(event: str, duration: float, **_: object) -> None:
    if event == _SAVED:
        with _lock:
            _counts["saved_s"] += duration


def _listen() -> None:
    global _listening
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True


def enable(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Turn on the persistent compilation cache (see the module docstring) and start counting what it serves;
    returns its directory, or None when ``PRISM_COMPILATION_CACHE`` turns it off. Call it before the first
    compile (the ``prism`` command does, first thing, and again in each sweep job's process: idempotent). The
    directory is also exported as ``JAX_COMPILATION_CACHE_DIR`` for the processes this one starts."""
    environ = os.environ if environ is None else environ
    _directory.clear()
    switch = environ.get(SWITCH_ENV, "1").strip().lower()
    if switch not in ON + OFF:
        raise ConfigError(f"{SWITCH_ENV}={environ[SWITCH_ENV]!r}: use 1 (on, the default) or 0 (off)")
    if switch in OFF:
        return None
    _listen()
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        _directory.append(Path(environ["JAX_COMPILATION_CACHE_DIR"]))
        return _directory[0]
    directory = cache_dir() / "jax"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a run must not fail, or warn at every compile, over its cache
        log.warning("compilation cache off: cannot create %s (%s); set PRISM_CACHE_DIR to a writable directory, "
                    "or %s=0", directory, exc, SWITCH_ENV)
        return None
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Exported too: processes started from this one (joblib/submitit sweep workers, peers) inherit the cache.
    environ["JAX_COMPILATION_CACHE_DIR"] = str(directory)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # JAX's cap needs filelock (a dependency)
        environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(MAX_BYTES)
    _directory.append(directory)
    return directory


def directory() -> Path | None:
    """The cache directory :func:`enable` turned on, or None."""
    return _directory[0] if _directory else None


def stats() -> dict[str, float]:
    """Since :func:`enable`: programs loaded from the cache (``hits``), programs compiled and written to it
    (``misses``: JAX stores, and counts, only those that took at least ``jax_persistent_cache_min_compile_time_secs``
    to compile, 1 s by default), and the compile time the hits saved (``saved_s``, JAX's estimate)."""
    with _lock:
        return dict(_counts)


def summary(since: dict[str, float] | None = None) -> str:
    """One line for the run log, counting from the :func:`stats` snapshot ``since`` (default: from
    :func:`enable`): ``compilation cache: 3 programs loaded (~41 s of compiling saved), 2 compiled and stored``."""
    now, before = stats(), since or {}
    s = {k: v - before.get(k, 0) for k, v in now.items()}
    programs = f"{s['hits']} program{'' if s['hits'] == 1 else 's'}"
    return (f"compilation cache: {programs} loaded (~{max(0.0, s['saved_s']):.0f} s of compiling saved), "
            f"{s['misses']} compiled and stored")
