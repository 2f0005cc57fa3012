"""Plugin discovery: import every built-in plugin module and every installed third-party plugin.

Built-ins are the modules under the top-level ``plugins`` package. Third-party packages declare an
entry point in the group ``prism.plugins`` whose value is a module (imported for its registrations)
or a callable (called once, after import)::

    [project.entry-points."prism.plugins"]
    my_models = "my_package.models"

Discovery runs once, lazily, before the first registry lookup. A module that fails to import is
recorded with its error, reported by a warning and in unknown-name errors, and the rest still load.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import traceback
import warnings
from collections.abc import Callable

ENTRY_POINT_GROUP = "prism.plugins"
BUILTIN_PACKAGE = "prism.plugins"



class Discovery:
    """One discovery pass that runs once, lazily (a pass started while it runs is skipped: a module it imports
    may look names up), and remembers what failed to load, each with a one-line error and a warning."""

    def __init__(self, what: str, warning: type[Warning], verb: str = "load") -> None:
        self.what, self.warning, self.verb = what, warning, verb
        self.loaded = self.loading = False
        self.failures: dict[str, str] = {}

    def record(self, label: str, message: str) -> None:
        self.failures[label] = message
        warnings.warn(f"prism {self.what} {label!r} failed to {self.verb}: {message}", self.warning, stacklevel=3)

    def run(self, load: Callable[[], None], *, force: bool = False) -> None:
        """Call ``load`` unless it ran already (``force``: again, forgetting earlier failures)."""
        if (self.loaded and not force) or self.loading:
            return
        self.loading = True
        try:
            if force:
                self.failures.clear()
            load()
            self.loaded = True
        finally:
            self.loading = False


class PluginImportWarning(UserWarning):
    """A plugin module raised on import; its registrations are missing."""


_discovery = Discovery("plugin", PluginImportWarning, verb="import")


def error_text(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame: what a failed plugin or command load reports."""
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _record_failure(name: str, exc: BaseException) -> None:
    _discovery.record(name, error_text(exc))


def _builtin_module_names() -> list[str]:
    package = importlib.import_module(BUILTIN_PACKAGE)
    return sorted(
        info.name
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{BUILTIN_PACKAGE}.")
        if not info.name.rsplit(".", 1)[-1].startswith("_")
    )


def _import_builtins() -> None:
    try:
        names = _builtin_module_names()
    except Exception as exc:  # the plugins package itself is broken
        _record_failure(BUILTIN_PACKAGE, exc)
        return
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            _record_failure(name, exc)


def _load_entry_points() -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"{ep.name} = {ep.value}"
        try:
            loaded = ep.load()
            if callable(loaded) and not isinstance(loaded, type(importlib)):
                loaded()
        except Exception as exc:
            _record_failure(label, exc)


def load_plugins(*, force: bool = False) -> None:
    """Import all built-in and entry-point plugins (once; ``force`` retries after a failure)."""
    _discovery.run(lambda: (_import_builtins(), _load_entry_points()), force=force)


def plugin_failures() -> dict[str, str]:
    """Plugin modules that failed to import, with a one-line error each."""
    return dict(_discovery.failures)
