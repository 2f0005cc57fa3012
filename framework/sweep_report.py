"""``prism sweep-report DIR``: a multirun directory -> a table, the best configuration, and plots.

Reads only what every job leaves in its directory (``.hydra/overrides.yaml``, ``.hydra/config.yaml``,
``result.json``, ``metrics.jsonl``), so it works for any launcher and for sweeps still running. Writes
into the sweep directory (or ``--out``):

- ``report.md`` / ``report.csv``: one row per job: the swept overrides, status, the target metric (final
  and best, with the best step), the other final evaluation metrics, steps, wall time, the error if any;
- with ``seed`` among the swept keys, mean ± sample std over seeds of every final evaluation metric for
  each setting of the other keys (``report_seeds.csv``), and the best configuration chosen by the mean;
- ``target_vs_params.png``: the target metric against each swept key; ``learning_curves.png``: every
  run's training loss and target metric against the step.
- with ``train.time_to`` targets, the seconds each job took to reach each (from process start and from its
  first step); over seeds, the 95 % bootstrap CI of each setting's mean, Welch's t-test against the best
  setting (p-values flagged below 3 seeds) and the seeds per setting that would tell the two apart
  (:mod:`prism.framework.stats`).

The target metric is the runs' ``checkpoint.best_metric`` (and ``best_mode``) unless given.
"""

from __future__ import annotations

import csv
import difflib
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from prism.framework.errors import ConfigError, DataError
from prism.framework.logging import read_metrics
from prism.framework.stats import MIN_SEEDS_FOR_TEST, bootstrap_ci, seeds_needed, welch_t_test
from prism.framework.sweep import Job, read_jobs, swept_keys

SEED_KEY = "seed"


@dataclass
class Row:
    """One job in the report."""

    job: Job
    params: dict[str, str]  # swept key -> value
    final: float | None  # the target metric at the end of the run
    best: float | None  # its best value over the run's evaluations ...
    best_step: int | None  # ... and the step it was reached at
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Report:
    sweep_dir: Path
    metric: str
    mode: str
    swept: list[str]
    rows: list[Row]
    eval_names: list[str]  # final evaluation metrics reported by the jobs
    seed_groups: list[dict[str, Any]]  # with a seed sweep: {"params", "n", metric: (mean, std)}
    best: dict[str, Any] | None  # {"params", "value", "jobs"} or None when no job completed
    files: dict[str, Path] = field(default_factory=dict)


def _number(value: str) -> float | None:
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _target(job: Job, metric: str | None, mode: str | None) -> tuple[str, str]:
    if metric and mode:
        return metric, mode
    config_path = job.dir / ".hydra" / "config.yaml"
    ckpt = OmegaConf.load(config_path).get("checkpoint", {}) if config_path.exists() else {}
    metric = metric or ckpt.get("best_metric") or ""
    if not metric:
        raise ConfigError("the runs set no checkpoint.best_metric: name the metric to report with --metric NAME")
    return metric, mode or ckpt.get("best_mode") or "max"


def _curves(job: Job) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in read_metrics(job.dir):
        for name, value in record.items():
            if "/" in name and isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(name, []).append((record["step"], float(value)))
    return series


def build_report(sweep_dir: str | Path, metric: str | None = None, mode: str | None = None) -> Report:
    """Read every job under ``sweep_dir`` and summarize them against ``metric`` (``max``/``min`` by ``mode``)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise DataError(f"sweep directory {root} does not exist")
    jobs = read_jobs(root)
    if not jobs:
        raise DataError(f"no job directories (with .hydra/overrides.yaml) under {root}: is it a multirun directory "
                        f"(multirun/DATE/TIME)?")
    if mode not in (None, "max", "min"):
        raise ConfigError(f"--mode must be 'max' or 'min', got {mode!r}")
    metric, mode = _target(jobs[0], metric, mode)

    swept = swept_keys(jobs)

    rows = []
    for job in jobs:
        curves = _curves(job)
        final = job.result.get("metrics", {}).get(metric) if job.status == "completed" else None
        best = best_step = None
        for step, value in curves.get(metric, []):
            if best is None or _better(value, best, mode):
                best, best_step = value, step
        rows.append(Row(job, {k: job.overrides.get(k, "") for k in swept}, final, best, best_step, curves))
    eval_names = sorted({n for r in rows for n in r.job.result.get("metrics", {})})
    reported = sorted(set(eval_names) | {n for r in rows for n in r.curves})
    if reported and metric not in reported:  # a typo would write a report of empty columns over a good one
        close = difflib.get_close_matches(metric, reported, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"no job of the sweep reports metric {metric!r}{hint}; the jobs report: "
                          f"{', '.join(reported)}")

    seed_groups: list[dict[str, Any]] = []
    if SEED_KEY in swept:
        others = [k for k in swept if k != SEED_KEY]
        groups: dict[tuple, list[Row]] = {}
        for row in rows:
            groups.setdefault(tuple(row.params[k] for k in others), []).append(row)
        for values, members in groups.items():
            done = [r for r in members if r.job.status == "completed"]
            group: dict[str, Any] = {"params": dict(zip(others, values, strict=True)), "n": len(done),
                                     "jobs": [r.job.name for r in done], "seeds": [r.params[SEED_KEY] for r in done]}
            group["values"] = {}
            for name in eval_names:
                vals = [r.job.result["metrics"][name] for r in done if name in r.job.result.get("metrics", {})]
                group["values"][name] = vals
                group[name] = (statistics.fmean(vals) if vals else None,
                               statistics.stdev(vals) if len(vals) > 1 else None)
            seed_groups.append(group)

    best = None
    if seed_groups:
        for g in seed_groups:
            mean = g.get(metric, (None, None))[0]
            if mean is not None and (best is None or _better(mean, best["value"], mode)):
                best = {"params": g["params"], "value": mean, "std": g[metric][1], "jobs": g["jobs"],
                        "seeds": g["seeds"]}
    else:
        for row in rows:
            if row.final is not None and (best is None or _better(row.final, best["value"], mode)):
                best = {"params": row.params, "value": row.final, "std": None, "jobs": [row.job.name]}
    if seed_groups and best is not None:
        _compare_with_best(seed_groups, best, metric)
    return Report(root, metric, mode, swept, rows, eval_names, seed_groups, best)


def _compare_with_best(seed_groups: list[dict[str, Any]], best: dict[str, Any], metric: str) -> None:
    """Give each seed group the 95 % bootstrap CI of its target mean and, against the best setting, Welch's
    t-test and the seeds per setting a t-test would need to tell the two apart (``g["stats"]``)."""
    best_values = next(g["values"][metric] for g in seed_groups if g["params"] == best["params"])
    for g in seed_groups:
        values = g["values"].get(metric, [])
        stats: dict[str, Any] = {"ci95": list(bootstrap_ci(values)) if values else None, "is_best": False,
                                 "t": None, "p": None, "seeds_needed": None,
                                 "few_seeds": min(len(values), len(best_values)) < MIN_SEEDS_FOR_TEST}
        if g["params"] == best["params"]:
            stats["is_best"] = True
        elif values:
            test = welch_t_test(best_values, values)
            if test is not None:
                stats["t"], stats["p"] = test
            stats["seeds_needed"] = seeds_needed(best_values, values)
        g["stats"] = stats


# -- output ----------------------------------------------------------------------------------------
def time_to_targets(report: Report) -> list[str]:
    """The ``train.time_to`` targets any job recorded (``result.json`` ``time_to`` keys), in numeric order."""
    keys = {k for r in report.rows for k in (r.job.result.get("time_to") or {})}
    return sorted(keys, key=lambda k: _number(k) if _number(k) is not None else math.inf)


def job_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """One row per job; with ``train.time_to`` targets, the seconds to each from process start and from the
    first step (empty where the run never reached it)."""
    others = [n for n in report.eval_names if n != report.metric]
    targets = time_to_targets(report)
    time_cols = [f"time to {t} ({since})" for t in targets for since in ("s from start", "s from first step")]
    header = ["job", "status", *report.swept, f"{report.metric} (final)", f"{report.metric} (best)", "best step",
              *others, "steps", "wall_s", *time_cols, "error"]
    rows = []
    for r in report.rows:
        res = r.job.result
        reached = res.get("time_to") or {}
        times = [(reached.get(t) or {}).get(k) for t in targets for k in ("from_start_s", "from_first_step_s")]
        rows.append([r.job.name, r.job.status, *(r.params[k] for k in report.swept), r.final, r.best, r.best_step,
                     *(res.get("metrics", {}).get(n) for n in others), res.get("steps"), res.get("wall_s"),
                     *times, r.job.error])
    return header, rows


def seed_table(report: Report, combined: bool = True) -> tuple[list[str], list[list[Any]]]:
    """Mean and sample std over seeds per setting: as ``mean ± std`` text (``combined``) or two numeric columns."""
    params = [k for k in report.swept if k != SEED_KEY]
    names = [report.metric, *(n for n in report.eval_names if n != report.metric)]
    stats = [f"{n} mean ± std" for n in names] if combined else [f"{n} {s}" for n in names for s in ("mean", "std")]
    ci_cols = [f"{report.metric} 95% CI"] if combined else [f"{report.metric} ci95 lo", f"{report.metric} ci95 hi"]
    compare = [*ci_cols, "p vs best (Welch)", "seeds needed"]
    header = [*params, "seeds", *stats, *compare]
    rows = []
    for g in report.seed_groups:
        cells: list[Any] = []
        st = g.get("stats", {})
        ci = st.get("ci95")
        if st.get("is_best"):
            p_cell: Any = "best"
        elif st.get("p") is None:
            p_cell = ""
        elif combined:
            p_cell = f"{st['p']:.3g}" + (f" (n<{MIN_SEEDS_FOR_TEST})" if st["few_seeds"] else "")
        else:
            p_cell = st["p"]
        if combined:
            ci_cells: list[Any] = [f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""]
        else:
            ci_cells = list(ci) if ci else [None, None]
        compared = [*ci_cells, p_cell, st.get("seeds_needed")]
        for n in names:
            mean, std = g.get(n, (None, None))
            if not combined:
                cells += [mean, std]
            elif mean is not None:
                cells.append(f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}")
            else:
                cells.append("")
        rows.append([*(g["params"][k] for k in params), g["n"], *cells, *compared])
    return header, rows


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])


def _axis_values(values: list[str]) -> tuple[list[float], list[str] | None, bool]:
    """x positions for override values: numbers as they are (log scale when positive over >= 10x), else
    categories in order of appearance."""
    numbers = [_number(v) for v in values]
    if all(n is not None for n in numbers):
        log = min(numbers) > 0 and max(numbers) / min(numbers) >= 9.99
        return numbers, None, log
    labels = list(dict.fromkeys(values))
    return [float(labels.index(v)) for v in values], labels, False


def plot_target_vs_params(report: Report, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in report.swept if k != SEED_KEY] or report.swept
    done = [r for r in report.rows if r.final is not None]
    if not keys or not done:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=True):
        xs, labels, log = _axis_values([r.params[key] for r in done])
        ys = [r.final for r in done]
        ax.scatter(xs, ys, alpha=0.6, label="runs")
        by_x: dict[float, list[float]] = {}
        for x, y in zip(xs, ys, strict=True):
            by_x.setdefault(x, []).append(y)
        mx = sorted(by_x)
        means = [statistics.fmean(by_x[x]) for x in mx]
        stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in mx]
        ax.errorbar(mx, means, yerr=stds, fmt="s-" if labels is None else "s", color="black", capsize=3,
                    markersize=4, label="mean ± std")
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 8 else 0)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(report.metric)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{report.metric} (final) against each swept key")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_learning_curves(report: Report, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("train/loss", report.metric) if any(n in r.curves for r in report.rows)]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=True):
        for r in report.rows:
            if name in r.curves:
                steps, values = zip(*r.curves[name], strict=True)
                label = " ".join(f"{k}={v}" for k, v in r.params.items()) or r.job.name
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=label,
                        linestyle="--" if r.job.status != "completed" else "-")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if len(report.rows) <= 16:
        axes.flat[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: Report, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv`` (+ ``report_seeds.csv``) and the PNG plots; returns their paths."""
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    header, rows = job_table(report)
    _write_csv(out / "report.csv", header, rows)
    files["csv"] = out / "report.csv"
    for key, plot in (("target_vs_params", plot_target_vs_params), ("learning_curves", plot_learning_curves)):
        written = plot(report, out / f"{key}.png")
        if written is not None:
            files[key] = written

    completed = sum(r.job.status == "completed" for r in report.rows)
    md = [f"# Sweep report: {report.sweep_dir}", "",
          f"{len(report.rows)} jobs, {completed} completed. Target: `{report.metric}` ({report.mode})."]
    if report.best is not None:
        params = " ".join(f"{k}={v}" for k, v in report.best["params"].items()) or "(no swept keys)"
        spread = f" ± {report.best['std']:.2g}" if report.best.get("std") is not None else ""
        over = (f"mean over seeds {', '.join(report.best['seeds'])}: jobs {', '.join(report.best['jobs'])}"
                if report.seed_groups else f"job {report.best['jobs'][0]}")
        value = f"{report.best['value']:.4g}{spread}"
        md += ["", f"**Best configuration:** `{params}`: {report.metric} = {value} ({over})."]
    md += ["", "## Jobs", "", markdown_table(header, rows)]
    if report.seed_groups:
        _write_csv(out / "report_seeds.csv", *seed_table(report, combined=False))
        s_header, s_rows = seed_table(report)
        files["seeds_csv"] = out / "report_seeds.csv"
        md += ["", "## Over seeds (mean ± sample std of completed runs)", "", markdown_table(s_header, s_rows), "",
               f"The CI is the percentile bootstrap interval of the mean of `{report.metric}`; the p-value is "
               f"Welch's two-sided t-test of each setting against the best one (flagged when either has fewer "
               f"than {MIN_SEEDS_FOR_TEST} seeds); seeds needed is the number per setting a two-sample t-test "
               f"would need to detect the observed difference at the observed spread (alpha 0.05, power 0.8)."]
    for key, title in (("target_vs_params", "Target against swept keys"), ("learning_curves", "Learning curves")):
        if key in files:
            md += ["", f"## {title}", "", f"![{title}]({files[key].name})"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    files["markdown"] = out / "report.md"
    report.files = files
    return files


def main(args: list[str]) -> int:
    """``prism sweep-report DIR [--metric NAME] [--mode max|min] [--out DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="prism sweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun directory (multirun/DATE/TIME)")
    parser.add_argument("--metric", help="target metric (default: the runs' checkpoint.best_metric)")
    parser.add_argument("--mode", choices=["max", "min"], help="better is higher or lower (default: best_mode)")
    parser.add_argument("--out", help="where to write the report (default: the sweep directory)")
    ns = parser.parse_args(args)
    report = build_report(ns.sweep_dir, ns.metric, ns.mode)
    files = write_report(report, ns.out)
    print(files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
