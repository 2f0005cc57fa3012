"""Table of self-supervised pre-training runs and their offline evaluations, from the runs' own files.

    python experiments/ssl_table.py RUN_DIR... [--record DIR] [--hardware FILE] [--write README.md]

Each RUN_DIR is a ``prism train`` run of an SSL objective whose ``eval/`` folder holds ``prism eval``
results (``linear_probe`` and ``knn``, at the run's checkpoint and, for the baseline, at ``eval.step=init``:
the same architecture and seed, untrained), at any depth (``eval.tasks=[linear_probe,knn] eval.out=DIR``
writes ``DIR/linear_probe/`` and ``DIR/knn/``). One row per pre-trained run plus one per
run evaluated at ``init``; numbers come from the ``result.json`` files, nothing is typed by hand. Runs with
different backbones share the table; each pre-trained run is compared with the baseline of its own backbone.
A RUN_DIR may be an earlier record (``DIR/<run name>``, without checkpoints): it is read in place.

--record DIR   copy the small files of each run (result.json, metrics.jsonl, .hydra/*.yaml, eval/**/result.json
               and config.yaml; not the checkpoints) into DIR/<run name>/ and build the table from the copies,
               so that the table's links point into the repository.
--hardware F   a text file describing the machine the given runs ran on (copied to each recorded run as hw.txt;
               a run's own hw.txt is shown under the table, grouped by backbone).
--write FILE   replace the section between ``<!-- ssl-table:begin -->`` and ``<!-- ssl-table:end -->`` in FILE
               (appended when absent); without it the section is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

BEGIN, END = "<!-- ssl-table:begin -->", "<!-- ssl-table:end -->"
TASKS = ("linear_probe", "knn")
#: Override keys that describe the machine, not the experiment (left out of the commands shown).
MACHINE_KEYS = ("hydra.", "dataset.path", "dataset.data_dir", "logging.")
SMALL_FILES = ("result.json", "metrics.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml")


class TableError(Exception):
    """A run directory lacks a file the table needs."""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TableError(f"cannot read {path}: {exc}") from exc


def _yaml(path: Path) -> dict | list | None:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def record(run_dir: Path, into: Path) -> Path:
    """Copy the small files of ``run_dir`` (not its checkpoints) to ``into/<run name>``; returns the copy."""
    target = into / run_dir.name
    if target.resolve() == run_dir.resolve():  # already a record (a run of an earlier session): keep it
        return target
    files = [run_dir / f for f in SMALL_FILES if (run_dir / f).is_file()]
    files += sorted(p for p in (run_dir / "eval").rglob("*") if p.name in ("result.json", "config.yaml"))
    for f in files:
        dest = target / f.relative_to(run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    return target


def evaluations(run_dir: Path) -> dict[tuple[str, bool], tuple[Path, dict]]:
    """``{(task, at_init): (eval dir, result)}``; of several evaluations of one kind, the newest folder."""
    found: dict[tuple[str, bool], tuple[Path, dict]] = {}
    for path in sorted((run_dir / "eval").rglob("result.json"), key=lambda p: p.stat().st_mtime):
        result = _json(path)
        if result.get("mode") != "offline" or result.get("task") not in TASKS:
            continue
        found[(result["task"], result.get("step") == "init")] = (path.parent, result)
    return found


def train_command(run_dir: Path, config: dict) -> str:
    overrides = _yaml(run_dir / ".hydra" / "overrides.yaml")
    if overrides is None:
        return f"(objective={config['objective']['name']}, built in-process: no command line recorded)"
    kept = [o for o in overrides if not o.lstrip("+~").startswith(MACHINE_KEYS)]
    return " ".join(["prism train", *kept])


def eval_command(run_name: str, result: dict) -> str:
    extra = [o for o in result.get("overrides", []) if not o.startswith(MACHINE_KEYS)]
    step = ["eval.step=init"] if result.get("step") == "init" else []
    return " ".join(["prism eval", f"checkpoint=.../{run_name}", *step, *extra])


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def rows(run_dir: Path, link: str) -> list[dict]:
    """Table rows of one run: the pre-trained weights, and the untrained ones when evaluated at init."""
    pretrain = _json(run_dir / "result.json")
    evals = evaluations(run_dir)
    if not evals:
        raise TableError(f"{run_dir}/eval holds no linear_probe or knn result (run prism eval checkpoint={run_dir} "
                         f"task=linear_probe first)")
    any_eval = next(iter(evals.values()))[0]
    # the run's own config (an evaluation's config.yaml holds the same run with the evaluation's task)
    config = _yaml(run_dir / ".hydra" / "config.yaml") or _yaml(any_eval / "config.yaml")
    if not config:
        raise TableError(f"no config.yaml in {run_dir / '.hydra'} or {any_eval}")
    train = config["train"]
    epochs = f"{train['epochs']:g} epochs" if not train.get("steps") else f"{train['steps']} steps"
    model = config["model"]
    arch = model["name"] + (f" {'-'.join(map(str, model['widths']))}" if model.get("widths") else "") + (
        f" ({model['stem']} stem)" if model.get("stem") else "")
    out = []
    for at_init in (False, True):
        probe, knn = evals.get(("linear_probe", at_init)), evals.get(("knn", at_init))
        if probe is None and knn is None:
            continue
        metric = lambda e, name: e[1]["metrics"].get(f"eval/{name}") if e else None  # noqa: E731
        settings = {**(probe[1]["task_settings"] if probe else {}), **(knn[1]["task_settings"] if knn else {})}
        out.append({
            "method": f"random init ({config['objective']['name']} run's seed)" if at_init
            else config["objective"]["name"],
            "arch": arch,
            "pretraining": "none" if at_init else epochs,
            "probe": metric(probe, "linear_probe/top1"),
            "knn": metric(knn, "knn/top1"),
            "online": None if at_init else pretrain.get("metrics", {}).get("eval/online_probe/top1"),
            "train_wall": None if at_init else pretrain.get("wall_s"),
            "eval_wall": sum(e[1].get("wall_s", 0.0) for e in (probe, knn) if e),
            "settings": settings,
            "link": link,
            "commands": ([] if at_init else [train_command(run_dir, config)])
            + [eval_command(run_dir.name, e[1]) for e in (probe, knn) if e],
            "at_init": at_init,
            "hardware": _hardware(run_dir),
        })
    return out


def _hardware(run_dir: Path) -> str | None:
    path = run_dir / "hw.txt"
    return path.read_text().strip().replace("\n", "; ") if path.is_file() else None


def render(all_rows: list[dict]) -> str:
    lines = [BEGIN, "<!-- written by experiments/ssl_table.py from the runs' result.json files; do not edit -->", "",
             "| method | backbone | pre-training | linear probe top-1 | kNN top-1 | online probe top-1 | "
             "pre-train wall | eval wall (probe + kNN) | commands |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        wall = "–" if r["train_wall"] is None else f"{r['train_wall']:.1f} s"
        commands = "<br>".join(f"`{c.strip()}`" for c in r["commands"])
        lines.append(f"| [{r['method']}]({r['link']}) | {r['arch']} | {r['pretraining']} | {_pct(r['probe'])} | "
                     f"{_pct(r['knn'])} | {_pct(r['online'])} | {wall} | {r['eval_wall']:.1f} s | {commands} |")
    settings = next((r["settings"] for r in all_rows if r["settings"]), {})
    if settings:
        keys = ("k", "temperature", "probe_epochs", "probe_batch_size", "probe_optimizer", "probe_lr",
                "probe_weight_decay", "standardize")
        lines += ["", "Offline evaluation settings (from the results' `task_settings`): "
                  + ", ".join(f"{k}={settings[k]}" for k in keys if k in settings) + "."]
    archs = list(dict.fromkeys(r["arch"] for r in all_rows))
    complete = lambda r: None not in (r["probe"], r["knn"])  # noqa: E731
    for arch in archs:
        group = [r for r in all_rows if r["arch"] == arch]
        base = next((r for r in group if r["at_init"] and complete(r)), None)
        gains = [f"{r['method']} {100 * (r['probe'] - base['probe']):+.2f} (linear probe), "
                 f"{100 * (r['knn'] - base['knn']):+.2f} (kNN)"
                 for r in group if base is not None and not r["at_init"] and complete(r)]
        if gains:
            lines += ["", f"{arch}: points gained over the random-init baseline: " + "; ".join(gains) + "."]
    machines = list(dict.fromkeys((r["arch"], r["hardware"]) for r in all_rows if r["hardware"]))
    for arch, machine in machines:
        lines += ["", f"Hardware ({arch} runs): {machine}."]
    return "\n".join([*lines, "", END])


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="prism train run directories")
    parser.add_argument("--record", type=Path, help="copy the runs' small files here and link the table to them")
    parser.add_argument("--hardware", type=Path, help="text file describing the machine")
    parser.add_argument("--write", type=Path, help="markdown file whose ssl-table section is replaced")
    args = parser.parse_args(argv)
    all_rows = []
    try:
        for run in args.runs:
            if not (run / "result.json").is_file():
                raise TableError(f"{run} is not a finished prism run (no result.json)")
            if args.record:
                fresh = run.resolve() != (args.record / run.name).resolve()
                run = record(run, args.record)
                if args.hardware and fresh:
                    shutil.copyfile(args.hardware, run / "hw.txt")
            base = args.write.parent if args.write else Path.cwd()
            all_rows += rows(run, os.path.relpath(run, base))
    except TableError as exc:
        print(f"ssl_table: error: {exc}", file=sys.stderr)
        return 2
    # grouped by backbone (in the order given), pre-trained rows first, the baseline last
    order = list(dict.fromkeys(r["arch"] for r in all_rows))
    all_rows.sort(key=lambda r: (order.index(r["arch"]), r["at_init"]))
    section = render(all_rows)
    if args.write:
        write_section(args.write, section)
    else:
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
