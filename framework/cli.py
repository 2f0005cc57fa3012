"""The ``prism`` command: ``prism COMMAND [ARGS]``, each command an entry of the ``COMMANDS`` registry.

Built-in commands: ``train`` (a Hydra app), ``eval``, ``predict``, ``explain``, ``export``, ``quantize``,
``list [KIND]``, ``bench``, ``sweep-report DIR``, ``reproduce NAME``, registered below with ``@COMMANDS.register``;
packages add theirs through the entry point group ``prism.commands`` (:mod:`prism.framework.commands`).
``prism --help`` lists them all.

Errors the user can fix (:class:`prism.framework.errors.PrismError`) are printed as one message and exit
with status 2; Hydra's own config errors (unknown key, wrong type) keep Hydra's message, which names
the key, and exit with status 1.
"""

from __future__ import annotations

import difflib
import functools
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from prism.framework import __version__, compilation_cache
from prism.framework.errors import ConfigError, PrismError, UnknownNameError
from prism.framework.parallel import apply_default_xla_flags, env_process_index
from prism.framework.registry import COMMANDS, Entry
from prism.framework.rundir import (
    FinishedRunGuard,
    RunDirectoryBusy,
    check_free,
    check_writable,
    disk_failure,
    run_directory_lock,
)
from prism.framework.sweep import SweepTracker, failure_summary, sweep_jobs

log = logging.getLogger("prism")


def command_usage(name: str) -> str:
    """The usage line of command ``name`` (its ``usage`` metadata)."""
    return COMMANDS.get(name).metadata.get("usage", f"prism {name} [ARGS]")


def usage() -> str:
    """``prism --help``: every registered command, with its description and usage line."""
    lines = ["usage: prism COMMAND [ARGS]", "", "commands:"]
    entries = COMMANDS.entries()
    width = max((len(e.name) for e in entries), default=0) + 2
    for entry in entries:
        lines.append(f"  {entry.name:<{width}}{entry.description}")
        lines.append(f"  {'':<{width}}  {entry.metadata.get('usage', f'prism {entry.name} [ARGS]')}")
    return "\n".join(lines)


def _fail(message: str, code: int = 2) -> int:
    print(f"prism: error: {message}", file=sys.stderr)
    return code


def check_repeated_sweep_keys(overrides: Sequence[str]) -> None:
    """Reject a key given twice when one of its values is a sweep (``model.widths=[4],[8] model.widths=[8]``).

    Hydra keeps the last value, so the sweep would silently run one job.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    seen: dict[str, list[tuple[str, bool]]] = {}
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:  # Hydra reports malformed overrides itself
            continue
        seen.setdefault(override.get_key_element().lstrip("+~"), []).append((arg, override.is_sweep_override()))
    for key, uses in seen.items():
        if len(uses) > 1 and any(is_sweep for _, is_sweep in uses):
            raise ConfigError(
                f"{key} is given {len(uses)} times ({', '.join(repr(a) for a, _ in uses)}); Hydra would keep only "
                f"the last and not sweep. Give each key once, with all its sweep values: {key}=a,b,c")


def check_group_choices(overrides: Sequence[str]) -> None:
    """Reject ``group=NAME`` overrides naming no registered plugin or preset, with close matches, a sweep key
    given twice (:func:`check_repeated_sweep_keys`), and ``+key=value`` adding a key no schema has
    (:func:`prism.framework.validate.check_added_keys`: ``+train.epoch=3``).

    Hydra would also refuse unknown names, but without suggestions; sweep lists (``model=a,b``) are checked
    name by name.
    """
    from prism.framework.config import SELECTED_KINDS, group_options
    from prism.framework.plugins import plugin_failures
    from prism.framework.validate import check_added_keys

    check_repeated_sweep_keys(overrides)
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
    check_added_keys(overrides)


def _validated(task: Callable) -> Callable:
    """Wrap a Hydra task function: :func:`prism.framework.validate.validate_config` on the composed config
    before the task runs. A bad value fails the job the way the task's own errors do: ``result.json`` says
    failed, a single run exits with one ``prism: error:`` line, a sweep's other jobs go on."""

    @functools.wraps(task)
    def wrapper(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from prism.framework.validate import validate_config

        try:
            validate_config(cfg)
        except ConfigError as exc:
            from prism.framework.train import write_failure

            hydra_cfg = HydraConfig.get()
            run_dir = Path(hydra_cfg.runtime.output_dir)
            write_failure(run_dir, exc)
            if hydra_cfg.mode == RunMode.MULTIRUN:
                log.error("job %s failed: %s: %s", run_dir, type(exc).__name__, exc)
                return None
            raise SystemExit(_fail(str(exc))) from None
        return task(cfg)

    return wrapper


def _train_app():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from prism.framework.config import CONF_DIR

    @hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
    @_validated
    def train(cfg) -> float | None:
        """Train one run; returns the final ``checkpoint.best_metric`` (what Hydra's sweepers optimize)."""
        from prism.framework.sweep import claim_devices
        from prism.framework.train import Trainer

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        try:
            if multirun and cfg.parallel.devices_per_job > 0:
                devices = claim_devices(cfg.parallel.devices_per_job, Path(hydra_cfg.sweep.dir) / ".devices")
                log.info("job %s: CUDA_VISIBLE_DEVICES=%s", hydra_cfg.job.num, devices)
            compilation_cache.enable()  # again: a launcher may run jobs in fresh worker processes
            cache_before = compilation_cache.stats()
            with run_directory_lock(run_dir):
                result = Trainer(cfg, run_dir).fit()
            if compilation_cache.directory() is not None:
                log.info("%s (%s)", compilation_cache.summary(since=cache_before), compilation_cache.directory())
        except Exception as exc:
            disk = disk_failure(exc, where=run_dir)
            unrecorded = None
            if not isinstance(exc, RunDirectoryBusy):  # the live run's record is not this process's to write
                unrecorded = _record_failure(run_dir, exc)
            if multirun:  # the other jobs go on; the sweep reports this one at the end (cmd_train)
                log.error("job %s failed: %s", run_dir, disk or f"{type(exc).__name__}: {exc}")
                return None
            if disk is not None:
                raise SystemExit(_fail(f"{disk}; free space or choose another hydra.run.dir{unrecorded or ''}")) \
                    from None
            if isinstance(exc, PrismError):
                raise SystemExit(_fail(str(exc))) from None
            raise
        if result.get("signal") == "SIGINT" and not multirun:  # Ctrl-C: saved, then the shell's 130
            raise SystemExit(130)
        best = cfg.checkpoint.best_metric
        return result["metrics"].get(best) if best else None

    return train


def _record_failure(run_dir: Path, exc: BaseException) -> str | None:
    """Write the failed run's record; when the disk refuses that too, the clause saying so (None: written)."""
    from prism.framework.train import write_failure

    try:
        write_failure(run_dir, exc)
    except OSError as write_error:
        return f" (its result.json could not be written either: {disk_failure(write_error, run_dir) or write_error})"
    return None


def _check_run_dir_free(args: Sequence[str]) -> Path | None:
    """The explicit ``hydra.run.dir`` of a single run (None without one); one that a live process holds, or
    one that cannot be written, stops here, before Hydra writes its ``.hydra/`` files into that directory.
    Without an explicit directory the working directory, where Hydra puts ``outputs/`` or ``multirun/``, must
    be writable."""
    if env_process_index() != 0:
        return None
    explicit = {key: Path(arg.split("=", 1)[1]) for arg in args for key in ("hydra.run.dir", "hydra.sweep.dir")
                if arg.startswith(key + "=")}
    if any(a in ("-m", "--multirun") for a in args):
        check_writable(explicit.get("hydra.sweep.dir", Path.cwd()))
        return None
    run_dir = explicit.get("hydra.run.dir")
    if run_dir is None:
        check_writable(Path.cwd())
        return None
    check_writable(run_dir)
    check_free(run_dir)
    return run_dir


@COMMANDS.register("train", description="Train a model (a Hydra app: `prism train --help` lists the config groups).",
                   usage="prism train [key=value ...] [+experiment=NAME] [-m for a sweep]")
def cmd_train(args: list[str]) -> int:
    from prism.framework.config import register_configs
    from prism.framework.plugins import load_plugins

    load_plugins()
    try:
        check_group_choices(args)
    except PrismError as exc:
        return _fail(str(exc))
    register_configs()
    try:
        run_dir = _check_run_dir_free(args)
    except PrismError as exc:  # busy or unwritable: nothing was written there
        return _fail(str(exc), code=1)
    logging.raiseExceptions = False  # a log file on a full disk: no "--- Logging error ---" traceback per record
    guard = FinishedRunGuard(run_dir) if run_dir is not None else None
    app = _train_app()
    saved_argv = sys.argv
    sys.argv = ["prism train", *args]
    SweepTracker.current = None
    code = 0
    try:
        app()
    except SystemExit as exc:  # a single run's clean error, or Hydra reporting a launcher/sweeper error
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
    attempt = guard.restore_if_failed() if guard is not None else None
    if attempt is not None:
        print(f"prism: the finished run in {guard.run_dir} is unchanged (result.json, .hydra/); this attempt's "
              f"record is {attempt}", file=sys.stderr)
    if SweepTracker.current is not None:  # a sweep ran: whatever the launcher, its directory tells
        sweep_dir, before = SweepTracker.current
        summary = failure_summary(sweep_dir, sweep_jobs(sweep_dir, before))
        if summary:
            return _fail(summary, code=code or 1)
    return code


EVAL_OPTIONS = ("checkpoint", "eval.step", "eval.out", "eval.tasks")


@COMMANDS.register("eval", description="Evaluate a saved run (its task, or other tasks), offline.",
                   usage="prism eval checkpoint=RUN_DIR [eval.step=best|latest|init|N] [eval.out=DIR] "
                         "[task=NAME | eval.tasks=[NAME,NAME,...]] [dataset=...] [key=value ...]")
def cmd_eval(args: list[str]) -> int:
    """``prism eval``: the run's metrics (or other tasks', several in one process) from one of its checkpoints,
    offline; one JSON line per task."""

    from prism.framework.evaluate import evaluate_run, evaluate_tasks, parse_task_list
    from prism.framework.plugins import load_plugins

    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in EVAL_OPTIONS}
    overrides = [a for a in args if a.split("=", 1)[0] not in EVAL_OPTIONS]
    if "checkpoint" not in options:
        return _fail("prism eval needs checkpoint=RUN_DIR (the directory of a prism train run)\n"
                     + command_usage("eval"))
    load_plugins()
    check_group_choices(overrides)
    step, out_dir = options.get("eval.step", "best"), options.get("eval.out")
    if "eval.tasks" in options:
        results = evaluate_tasks(options["checkpoint"], parse_task_list(options["eval.tasks"]), overrides, step=step,
                                 out_dir=out_dir)
    else:
        results = [evaluate_run(options["checkpoint"], overrides, step=step, out_dir=out_dir)]
    from prism.framework.logging import to_json

    for result in results:
        print(to_json({k: result[k] for k in ("task", "step", "metrics", "out_dir")}))
    return 0


PREDICT_OPTIONS = ("checkpoint", "input", "out", "step")


@COMMANDS.register("predict", description="Predict on unlabelled images with a saved run.",
                   usage="prism predict checkpoint=RUN_DIR input=IMAGE_OR_FOLDER [out=DIR] [step=best|latest|N] "
                         "[key=value ...]")
def cmd_predict(args: list[str]) -> int:
    """``prism predict``: a saved run's predictions on image files, drawn and written as JSON."""
    import json

    from prism.framework.plugins import load_plugins
    from prism.framework.predict import predict_run

    options = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.split("=", 1)[0] in PREDICT_OPTIONS}
    overrides = [a for a in args if a.split("=", 1)[0] not in PREDICT_OPTIONS]
    missing = [k for k in ("checkpoint", "input") if k not in options]
    if missing:
        return _fail(f"prism predict needs {' and '.join(f'{k}=...' for k in missing)}\n{command_usage('predict')}")
    load_plugins()
    check_group_choices(overrides)
    result = predict_run(options["checkpoint"], options["input"], overrides, step=options.get("step", "best"),
                         out_dir=options.get("out"))
    print(json.dumps({k: result[k] for k in ("images", "step", "out_dir")}))
    return 0


EXPLAIN_OPTIONS = ("checkpoint", "input", "method", "target", "layer", "out", "step")


@COMMANDS.register("explain", description="Explain a saved classifier's predictions on images (saliency maps).",
                   usage="prism explain checkpoint=RUN_DIR input=IMAGE_OR_FOLDER method=NAME [target=pred|CLASS] "
                         "[layer=NAME] [method.KEY=VALUE ...] [out=DIR] [step=best|latest|N] [key=value ...]")
def cmd_explain(args: list[str]) -> int:
    """``prism explain``: saliency maps of a saved run (``prism list explainer``: the methods), as overlay PNGs
    and raw ``.npy`` maps."""
    import json

    from prism.framework.explain import explain_run
    from prism.framework.plugins import load_plugins

    pairs = [a.split("=", 1) if "=" in a else [a, None] for a in args]
    options = {k: v for k, v in pairs if k in EXPLAIN_OPTIONS}
    settings = {k.split(".", 1)[1]: v for k, v in pairs if k.startswith("method.")}
    overrides = [a for a, (k, _) in zip(args, pairs, strict=True) if k not in EXPLAIN_OPTIONS
                 and not k.startswith("method.")]
    missing = [k for k in ("checkpoint", "input", "method") if k not in options]
    if missing:
        return _fail(f"prism explain needs {' and '.join(f'{k}=...' for k in missing)}\n{command_usage('explain')}")
    load_plugins()
    check_group_choices(overrides)
    result = explain_run(options["checkpoint"], options["input"], options["method"], settings=settings,
                         target=options.get("target", "pred"), layer=options.get("layer", ""), overrides=overrides,
                         step=options.get("step", "best"), out_dir=options.get("out"))
    print(json.dumps({k: result[k] for k in ("images", "method", "layer", "step", "out_dir")}))
    return 0


def _model_stats_column(names: list[str], compute: bool) -> tuple[dict[str, str], int]:
    """``({name: "params  GFLOPs" text}, number not cached)`` for model rows; computes missing ones when asked."""
    from prism.framework.model_summary import cached_summary

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


@COMMANDS.register("list", description="List registered plugins and commands (models with parameters and "
                                         "GFLOPs; --stats computes them).",
                   usage="prism list [KIND [PATTERN]] [--stats]   (kinds: model, dataset, objective, ..., command)")
def cmd_list(args: list[str]) -> int:
    """``prism list [KIND] [PATTERN] [--stats]``; models show parameters and GFLOPs (cached; ``--stats``
    computes missing ones, seconds per model on a CPU)."""
    import warnings

    from prism.framework.plugins import PluginImportWarning, load_plugins, plugin_failures
    from prism.framework.registry import MODELS, REGISTRIES, registry_for

    stats = "--stats" in args
    positional = [a for a in args if a != "--stats"]
    unknown = [a for a in positional if a.startswith("-")]
    if unknown or len(positional) > 2:
        return _fail(f"unexpected argument {(unknown or positional[2:])[0]!r}; usage: {command_usage('list')}")
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
            from prism.framework.compilation_cache import cache_dir
            from prism.framework.model_summary import STATS_FILE

            print(f"(parameters and forward GFLOPs at the default input size of {missing} model(s) not computed "
                  f"yet: `prism list model{' ' + pattern if pattern else ''} --stats` computes them, seconds per "
                  f"model on a CPU, and caches them in {cache_dir() / STATS_FILE})")
    for module, error in plugin_failures().items():
        print(f"warning: plugin {module} failed to import: {error}", file=sys.stderr)
    _print_command_failures()
    return 0


@COMMANDS.register("bench", description="Benchmark the input pipeline, training steps, or inference (JAX vs "
                                          "onnxruntime).",
                   usage="prism bench data|train [--steps N] [--data synthetic|pipeline] [--out PATH] [key=value ...] "
                         "| prism bench infer checkpoint=RUN_DIR|FILE [device=cpu|gpu] [batch=1,8,64]")
def cmd_bench(args: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from prism.framework.bench import main as bench_main
    from prism.framework.plugins import load_plugins

    load_plugins()
    check_group_choices([a for a in args if not a.startswith("-")])
    try:
        return bench_main(args)
    except (HydraException, OmegaConfBaseException) as exc:  # Hydra's message names the key
        return _fail(str(exc), code=1)


@COMMANDS.register("sweep-report", description="Tabulate and plot a sweep (a multirun directory).",
                   usage="prism sweep-report MULTIRUN_DIR [--metric NAME] [--mode max|min] [--out DIR]")
def cmd_sweep_report(args: list[str]) -> int:
    from prism.framework.sweep_report import main as report_main

    return report_main(args)


@COMMANDS.register("reproduce", description="Run experiments' claims (experiments/*/claim.yaml) over seeds and "
                                              "check them: mean ± std, bootstrap CI, pass/fail/inconclusive.",
                   usage="prism reproduce NAME... | --all [--smoke] [--seeds N] [--out DIR] [key=value ...] | --list")
def cmd_reproduce(args: list[str]) -> int:
    from prism.framework.reproduce import main as reproduce_main

    return reproduce_main(args)


@COMMANDS.register("export", description="Export a saved run's inference function to ONNX or StableHLO, checked "
                                           "against JAX on evaluation images (exit 1 when it differs).",
                   usage="prism export checkpoint=RUN_DIR format=onnx|stablehlo [step=best|latest|N] "
                         "[batch=dynamic|N] [out=FILE] [export.images=32] [export.atol=1e-4] [export.rtol=1e-4]")
def cmd_export(args: list[str]) -> int:
    from prism.framework.export import main as export_main

    return export_main(args)


@COMMANDS.register("quantize", description="Static int8 quantization of a saved run's ONNX export (onnxruntime): "
                                             "accuracy fp32 vs int8, file sizes, CPU latency.",
                   usage="prism quantize checkpoint=RUN_DIR [calibration=N] [step=best|latest|N] [out=DIR]")
def cmd_quantize(args: list[str]) -> int:
    from prism.framework.quantize import main as quantize_main

    return quantize_main(args)


def find_command(name: str) -> Entry | None:
    """The command ``name``: a built-in or ``prism.commands`` entry point, else one a ``prism.plugins`` module
    registers (plugins are loaded only then); None when nobody registered it."""
    if name in COMMANDS:
        return COMMANDS.get(name)
    from prism.framework.plugins import load_plugins

    load_plugins()
    return COMMANDS.get(name) if name in COMMANDS else None


def _print_command_failures() -> None:
    from prism.framework.commands import command_failures

    for label, error in command_failures().items():
        print(f"warning: prism command {label} failed to load: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from prism.framework.commands import CommandImportWarning

    args = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():  # failures are reported once, below
        warnings.simplefilter("ignore", CommandImportWarning)
        if not args or args[0] in ("-h", "--help", "help"):
            print(usage())
            _print_command_failures()
            return 0
        if args[0] == "--version":
            print(f"prism {__version__}")
            return 0
        command, rest = args[0], args[1:]
        apply_default_xla_flags()  # before anything starts a JAX backend
        try:
            compilation_cache.enable()  # before anything compiles
        except PrismError as exc:
            return _fail(str(exc))
        entry = find_command(command)
    if entry is None:
        from prism.framework.commands import command_failures

        close = difflib.get_close_matches(command, COMMANDS.names(), n=1)
        hint = f" Did you mean: {close[0]}?" if close else ""
        failed = "".join(f"\nprism command {label} failed to load: {error}"
                         for label, error in command_failures().items())
        return _fail(f"unknown command {command!r}.{hint}{failed}\n{usage()}")
    try:
        code = entry.builder(rest)
    except PrismError as exc:
        return _fail(str(exc))
    return 0 if code is None else code


if __name__ == "__main__":  # the commands above registered under __main__, not prism.framework.cli
    sys.exit(_fail("run `python -m prism.framework` (or `prism`)"))
