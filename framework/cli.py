"""The ``prism`` command: ``prism train`` (a Hydra app), ``prism eval``, ``prism list [KIND]``, ``prism bench``.

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
    "eval": "evaluate a saved run: prism eval checkpoint=RUN_DIR [eval.step=best|latest|init|N] [eval.out=DIR] "
            "[task=...] [dataset=...] [key=value ...]",
    "list": "list registered plugins: prism list [KIND] (kinds: model, dataset, objective, task, ...)",
    "bench": "benchmark: prism bench data|train [--steps N] [--data synthetic|pipeline] [--out PATH] [key=value ...]",
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


EVAL_OPTIONS = ("checkpoint", "eval.step", "eval.out")


def cmd_eval(args: list[str]) -> int:
    """``prism eval``: the run's metrics (or another task's) from one of its checkpoints, offline."""
    import json

    from framework.evaluate import evaluate_run
    from framework.plugins import load_plugins

    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in EVAL_OPTIONS}
    overrides = [a for a in args if a.split("=", 1)[0] not in EVAL_OPTIONS]
    if "checkpoint" not in options:
        return _fail("prism eval needs checkpoint=RUN_DIR (the directory of a prism train run)\n"
                     + COMMANDS["eval"])
    load_plugins()
    check_group_choices(overrides)
    result = evaluate_run(options["checkpoint"], overrides, step=options.get("eval.step", "best"),
                          out_dir=options.get("eval.out"))
    print(json.dumps({k: result[k] for k in ("task", "step", "metrics", "out_dir")}))
    return 0


def cmd_list(args: list[str]) -> int:
    import warnings

    from framework.plugins import PluginImportWarning, load_plugins, plugin_failures
    from framework.registry import REGISTRIES, registry_for

    with warnings.catch_warnings():  # failures are reported once, below
        warnings.simplefilter("ignore", PluginImportWarning)
        load_plugins()
    registries = [registry_for(args[0])] if args else list(REGISTRIES.values())
    for registry in registries:
        entries = registry.entries()
        print(f"{registry.plural} ({len(entries)}):")
        width = max((len(e.name) for e in entries), default=0)
        for e in entries:
            print(f"  {e.name:<{width}}  {e.description}")
        if not entries:
            print("  (none registered)")
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
    handlers = {"train": cmd_train, "eval": cmd_eval, "list": cmd_list, "bench": cmd_bench}
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
