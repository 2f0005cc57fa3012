"""The ``prism`` command: ``prism train`` (a Hydra app), ``prism list [KIND]``.

Errors the user can fix (:class:`framework.errors.PrismError`) are printed as one message and exit
with status 2; Hydra's own config errors (unknown key, wrong type) keep Hydra's message, which names
the key, and exit with status 1.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from framework import __version__
from framework.errors import PrismError, UnknownNameError

log = logging.getLogger("prism")

COMMANDS = {
    "train": "train a model: prism train [key=value ...] [-m for a sweep] (a Hydra app; --help lists groups)",
    "list": "list registered plugins: prism list [KIND [PATTERN]] [--stats] (kinds: model, dataset, objective, ...;"
            " models show parameters and GFLOPs, --stats computes them)",
    "bench": "benchmark the input pipeline: prism bench data [--batches N] [--out PATH] [key=value ...]",
}

USAGE = "usage: prism COMMAND [ARGS]\n\ncommands:\n" + "\n".join(
    f"  {name:<7} {text}" for name, text in COMMANDS.items()
)

#: Failed jobs of the current sweep (run directory, error), reported when the sweep ends.
_failed_jobs: list[tuple[str, str]] = []


def _fail(message: str, code: int = 2) -> int:
    print(f"prism: error: {message}", file=sys.stderr)
    return code


def check_group_choices(overrides: Sequence[str]) -> None:
    """Reject ``group=NAME`` overrides naming no registered plugin or preset, with close matches.

    Hydra would also refuse them, but without suggestions; sweep lists (``model=a,b``) are checked
    name by name.
    """
    from framework.config import SELECTED_KINDS, group_options
    from framework.plugins import plugin_failures

    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in SELECTED_KINDS or "(" in value or "$" in value:
            continue
        options = group_options(key)
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in options:
                close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise UnknownNameError(
                    f"unknown {key} {name!r} in override '{arg}'.{hint} Available: {', '.join(options)}. "
                    f"(`prism list {key}` describes them.)"
                    + "".join(f" Plugin module {m} failed to import (its names are missing): {e}."
                              for m, e in plugin_failures().items())
                )


def _train_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from framework.config import CONF_DIR

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    def train(cfg) -> float | None:
        from framework.train import Trainer, write_failure

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            result = Trainer(cfg, run_dir).fit()
        except Exception as exc:
            write_failure(run_dir, exc)
            expected = isinstance(exc, PrismError)
            if hydra_cfg.mode == RunMode.MULTIRUN:
                log.error("job %s failed: %s: %s", run_dir, type(exc).__name__, exc)
                _failed_jobs.append((str(run_dir), f"{type(exc).__name__}: {exc}"))
                return None
            if expected:
                raise SystemExit(_fail(str(exc))) from None
            raise
        best = cfg.checkpoint.best_metric
        return result["metrics"].get(best) if best else None

    return train


def cmd_train(args: list[str]) -> int:
    from framework.config import register_configs
    from framework.plugins import load_plugins

    load_plugins()
    try:
        check_group_choices(args)
    except PrismError as exc:
        return _fail(str(exc))
    register_configs()
    app = _train_app()
    saved_argv = sys.argv
    sys.argv = ["prism train", *args]
    try:
        app()
    finally:
        sys.argv = saved_argv
    if _failed_jobs:
        lines = "\n".join(f"  {d}: {e}" for d, e in _failed_jobs)
        return _fail(f"{len(_failed_jobs)} sweep job(s) failed:\n{lines}", code=1)
    return 0


def _model_stats_column(names: list[str], compute: bool) -> tuple[dict[str, str], int]:
    """``({name: "params  GFLOPs" text}, number not cached)`` for model rows; computes missing ones when asked."""
    from framework.model_summary import cached_summary

    column, missing = {}, 0
    for name in names:
        try:
            if compute and cached_summary(name, compute=False) is None:
                print(f"computing the size and cost of {name} ...", file=sys.stderr, flush=True)
            stats = cached_summary(name, compute=compute)
        except Exception as exc:  # one model that cannot be summarised must not hide the others
            column[name] = f"(stats failed: {type(exc).__name__}: {exc})"
            continue
        if stats is None:
            missing += 1
            column[name] = f"{'-':>11} params {'-':>7} GFLOPs"
        else:
            column[name] = f"{stats['params']:>11,} params {stats['gflops']:>7.2f} GFLOPs"
    return column, missing


def cmd_list(args: list[str]) -> int:
    """``prism list [KIND] [PATTERN] [--stats]``; models show parameters and GFLOPs (cached; ``--stats``
    computes missing ones, seconds per model on a CPU)."""
    import warnings

    from framework.plugins import PluginImportWarning, load_plugins, plugin_failures
    from framework.registry import MODELS, REGISTRIES, registry_for

    stats = "--stats" in args
    positional = [a for a in args if a != "--stats"]
    unknown = [a for a in positional if a.startswith("-")]
    if unknown or len(positional) > 2:
        return _fail(f"unexpected argument {(unknown or positional[2:])[0]!r}; usage: {COMMANDS['list']}")
    with warnings.catch_warnings():  # failures are reported once, below
        warnings.simplefilter("ignore", PluginImportWarning)
        load_plugins()
    registries = [registry_for(positional[0])] if positional else list(REGISTRIES.values())
    if stats and registries != [MODELS]:
        return _fail("--stats applies to models: prism list model [PATTERN] --stats")
    pattern = positional[1] if len(positional) > 1 else None
    for registry in registries:
        entries = [registry.get(n) for n in registry.names(pattern)]
        print(f"{registry.plural} ({len(entries)}):")
        width = max((len(e.name) for e in entries), default=0)
        column, missing = ({}, 0)
        if registry is MODELS and positional:
            column, missing = _model_stats_column([e.name for e in entries], compute=stats)
        for e in entries:
            middle = f"{column[e.name]}  " if e.name in column else ""
            print(f"  {e.name:<{width}}  {middle}{e.description}")
        if not entries:
            print("  (none registered)" if pattern is None else f"  (none matching {pattern!r})")
        if missing:
            from framework.model_summary import STATS_FILE, cache_dir

            print(f"(parameters and forward GFLOPs at the default input size of {missing} model(s) not computed "
                  f"yet: `prism list model{' ' + pattern if pattern else ''} --stats` computes them, seconds per "
                  f"model on a CPU, and caches them in {cache_dir() / STATS_FILE})")
    for module, error in plugin_failures().items():
        print(f"warning: plugin {module} failed to import: {error}", file=sys.stderr)
    return 0


def cmd_bench(args: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from framework.bench import main as bench_main
    from framework.plugins import load_plugins

    load_plugins()
    check_group_choices([a for a in args if not a.startswith("-")])
    try:
        return bench_main(args)
    except (HydraException, OmegaConfBaseException) as exc:  # Hydra's message names the key
        return _fail(str(exc), code=1)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "--version":
        print(f"prism {__version__}")
        return 0
    command, rest = args[0], args[1:]
    handlers = {"train": cmd_train, "list": cmd_list, "bench": cmd_bench}
    if command not in handlers:
        close = difflib.get_close_matches(command, list(handlers), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        return _fail(f"unknown command {command!r}.{hint}\n{USAGE}")
    try:
        return handlers[command](rest)
    except PrismError as exc:
        return _fail(str(exc))


if __name__ == "__main__":
    sys.exit(main())
