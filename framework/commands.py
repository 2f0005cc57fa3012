"""Command discovery: the ``prism <command>`` subcommands in :data:`prism.framework.registry.COMMANDS`.

A command is a handler ``(args: list[str]) -> int`` (the exit status) registered like any plugin::

    from prism.framework.registry import COMMANDS

    @COMMANDS.register("hello", usage="prism hello [NAME]")
    def hello(args: list[str]) -> int:
        \"\"\"Say hello (the first docstring line is what ``prism --help`` shows).\"\"\"
        print("hello", *args)
        return 0

The built-in commands (``train``, ``eval``, ``predict``, ``explain``, ``export``, ``quantize``, ``list``, ``bench``,
``sweep-report``, ``reproduce``) are registered in :mod:`prism.framework.cli`. A package adds one through an entry
point in the group ``prism.commands``, named after the command; its value is the handler, or a module that registers
its commands on import::

    [project.entry-points."prism.commands"]
    hello = "my_package.cli:hello"

Why a group of its own rather than ``prism.plugins``: the CLI must resolve ``prism NAME`` and print
``prism --help`` without importing every model, dataset and objective module of every installed plugin
package (heavy imports, and one broken plugin would spoil ``--help``). An entry point named after its
command is found by name, and only the command that runs is imported. A ``prism.plugins`` module may still
register a command with ``COMMANDS.register``; such commands are found when plugins are loaded (``prism list``,
and before ``prism NAME`` is refused as unknown).

Discovery runs once, lazily, before the first ``COMMANDS`` lookup; an entry point that fails to load is
recorded with its error (:func:`command_failures`), reported by ``prism --help`` and in unknown-command
errors, and the other commands still work.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import types

from prism.framework.plugins import Discovery, error_text

ENTRY_POINT_GROUP = "prism.commands"
#: The module whose import registers the built-in commands.
BUILTIN_MODULE = "prism.framework.cli"



class CommandImportWarning(UserWarning):
    """A ``prism.commands`` entry point failed to load; its command is missing."""


_discovery = Discovery("command", CommandImportWarning)
_record_failure = _discovery.record


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> None:
    from prism.framework.registry import COMMANDS, Entry

    label = f"{ep.name} = {ep.value}"
    try:
        loaded = ep.load()
    except Exception as exc:
        _record_failure(label, error_text(exc))
        return
    registered = COMMANDS._entries.get(ep.name)
    if isinstance(loaded, types.ModuleType):  # the module registered its commands on import
        if registered is None:
            _record_failure(label, f"module {loaded.__name__} registered no command {ep.name!r}")
        return
    if not callable(loaded):
        _record_failure(label, f"{ep.value} is neither a module nor a callable (args) -> int")
        return
    if registered is not None and registered.builder is loaded:  # decorated with COMMANDS.register as well
        return
    doc = inspect.getdoc(loaded) or ""
    try:
        COMMANDS.add(Entry(kind="command", name=ep.name, builder=loaded, config=None,
                           description=doc.strip().splitlines()[0] if doc.strip() else "",
                           module=getattr(loaded, "__module__", "?"), metadata={"usage": f"prism {ep.name} ..."}))
    except Exception as exc:  # a name taken by a built-in or by another package
        _record_failure(label, error_text(exc))


def load_commands(*, force: bool = False) -> None:
    """Register the built-in commands and every ``prism.commands`` entry point (once; ``force`` retries)."""

    def load() -> None:
        importlib.import_module(BUILTIN_MODULE)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_entry_point(ep)

    _discovery.run(load, force=force)


def command_failures() -> dict[str, str]:
    """``prism.commands`` entry points that failed to load, with a one-line error each."""
    return dict(_discovery.failures)
