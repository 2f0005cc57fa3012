"""Named registries of plugins: one :class:`Registry` per kind (models, objectives, tasks, ...).

A plugin registers a *builder* (a function or class) together with its config dataclass and a
one-line description::

    @MODELS.register("tiny_mlp", config=TinyMLPConfig, description="Two dense layers.")
    def build_tiny_mlp(cfg: TinyMLPConfig, *, data, rngs): ...

Lookups load every plugin first (see :mod:`prism.framework.plugins`), so a name is never missing just
because its module was not imported, and an unknown name gets an error that lists the closest
registered names, all names, and the plugin modules that failed to import.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from prism.framework.errors import DuplicateNameError, UnknownNameError

T = TypeVar("T", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry:
    """One registered plugin: its name, builder, config dataclass and description."""

    kind: str
    name: str
    builder: Callable[..., Any]
    config: type | None
    description: str
    module: str
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def default_config(self) -> Any:
        """An instance of the config dataclass with its defaults (``None`` when it has none)."""
        return self.config() if self.config is not None else None


def _first_doc_line(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _load_plugins() -> None:
    from prism.framework.plugins import load_plugins

    load_plugins()


def _plugin_failures() -> dict[str, str]:
    from prism.framework.plugins import plugin_failures

    return plugin_failures()


class Registry:
    """Maps names to :class:`Entry` objects for one kind of plugin.

    ``loader`` fills the registry before every lookup (default: :func:`prism.framework.plugins.load_plugins`,
    which imports every plugin module once); ``failures`` names the modules that failed to load, for
    unknown-name errors. :data:`COMMANDS` uses its own pair (:mod:`prism.framework.commands`).
    """

    def __init__(
        self,
        kind: str,
        plural: str | None = None,
        *,
        loader: Callable[[], None] | None = None,
        failures: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self._entries: dict[str, Entry] = {}
        self._load = loader or _load_plugins
        self._failures = failures or _plugin_failures

    # -- registration -------------------------------------------------------------------------
    def register(
        self,
        name: str,
        *,
        config: type | None = None,
        description: str | None = None,
        override: bool = False,
        **metadata: Any,
    ) -> Callable[[T], T]:
        """Decorator that registers ``builder`` under ``name``.

        ``config`` must be a dataclass (it becomes the Hydra config group entry ``<kind>/<name>``);
        ``description`` defaults to the first line of the builder's docstring. Registering a taken
        name raises :class:`DuplicateNameError` unless ``override=True``.
        """
        if config is not None and not (isinstance(config, type) and dataclasses.is_dataclass(config)):
            raise TypeError(f"{self.kind} {name!r}: config must be a dataclass, got {config!r}")

        def decorator(builder: T) -> T:
            self.add(
                Entry(
                    kind=self.kind,
                    name=name,
                    builder=builder,
                    config=config,
                    description=description or _first_doc_line(builder),
                    module=getattr(builder, "__module__", "?"),
                    metadata=dict(metadata),
                ),
                override=override,
            )
            return builder

        return decorator

    def add(self, entry: Entry, *, override: bool = False) -> None:
        """Register a ready-made :class:`Entry` (the decorator's underlying operation)."""
        existing = self._entries.get(entry.name)
        reloaded = existing is not None and (existing.module, getattr(existing.builder, "__qualname__", None)) == (
            entry.module, getattr(entry.builder, "__qualname__", None))  # importlib.reload of the same module
        if existing is not None and not override and existing.builder is not entry.builder and not reloaded:
            raise DuplicateNameError(
                f"{self.kind} {entry.name!r} is already registered by {existing.module}; "
                f"{entry.module} tried to register it again. Pick another name, or pass "
                f"override=True to replace it on purpose."
            )
        self._entries[entry.name] = entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (used by tests and by plugins that replace a built-in)."""
        self._entries.pop(name, None)

    # -- lookup -------------------------------------------------------------------------------
    def get(self, name: str) -> Entry:
        """The entry registered as ``name``; an :class:`UnknownNameError` with suggestions if none."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            pass
        close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        lines = [f"unknown {self.kind} {name!r}."]
        if close:
            lines.append(f"Did you mean: {', '.join(close)}?")
        lines.append(f"Registered {self.plural}: {', '.join(sorted(self._entries)) or '(none)'}.")
        failures = self._failures()
        if failures:
            lines.append(
                "Plugin modules that failed to import (their names are missing): "
                + "; ".join(f"{mod}: {err}" for mod, err in failures.items())
            )
        raise UnknownNameError(" ".join(lines))

    def build(self, name: str, cfg: Any = None, /, **kwargs: Any) -> Any:
        """Look up ``name`` and call its builder with ``cfg`` (defaults when omitted) and ``kwargs``."""
        entry = self.get(name)
        if entry.config is None:
            return entry.builder(**kwargs)
        return entry.builder(cfg if cfg is not None else entry.default_config(), **kwargs)

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a shell-style pattern (``resnet*``)."""
        self._load()
        names = sorted(self._entries)
        return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


MODELS = Registry("model")
OBJECTIVES = Registry("objective")
TASKS = Registry("task")
DATASETS = Registry("dataset")
TRANSFORMS = Registry("transform")
OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")
METRICS = Registry("metric")
#: Saliency methods (``prism explain method=NAME``, task ``explain_faithfulness``): the builder returns an
#: :class:`prism.framework.api.Explainer`.
EXPLAINERS = Registry("explainer")


def _load_commands() -> None:
    from prism.framework.commands import load_commands

    load_commands()


def _command_failures() -> dict[str, str]:
    from prism.framework.commands import command_failures

    return command_failures()


#: ``prism <command>``: the builder is the handler, ``(args: list[str]) -> int`` (the exit status); metadata
#: ``usage`` is the line ``prism --help`` and argument errors show. Built-ins are in :mod:`prism.framework.cli`;
#: packages add commands through the entry point group ``prism.commands`` (see :mod:`prism.framework.commands`).
COMMANDS = Registry("command", loader=_load_commands, failures=_command_failures)

#: Every registry by kind; the plugin kinds (all but ``command``) are also the Hydra config groups.
REGISTRIES: dict[str, Registry] = {
    r.kind: r for r in (MODELS, OBJECTIVES, TASKS, DATASETS, TRANSFORMS, OPTIMIZERS, SCHEDULES, METRICS, EXPLAINERS,
                        COMMANDS)
}


def registry_for(kind: str) -> Registry:
    """The registry of ``kind`` (singular or plural), with a suggestion for a misspelt kind."""
    key = kind[:-1] if kind.endswith("s") and kind[:-1] in REGISTRIES else kind
    if key in REGISTRIES:
        return REGISTRIES[key]
    close = difflib.get_close_matches(key, list(REGISTRIES), n=2, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownNameError(f"unknown plugin kind {kind!r}.{hint} Kinds: {', '.join(REGISTRIES)}.")
