"""``prism reproduce``: paper baselines as checked, versioned claims.

Each experiment folder may declare a claim in ``experiments/<name>/claim.yaml`` (``<name>`` may be nested:
``ssl_fashion_mnist/simclr``): the ``prism train`` overrides that reproduce it, the metric, the published
number and its source, our expected number with a tolerance, the seeds, the hardware class and the expected
wall time, plus a ``smoke`` profile that runs the same code in seconds on a CPU with its own expected value.
:data:`CLAIM_KEYS` and :data:`PROFILE_KEYS` list the keys; ``experiments/README.md`` shows one.

``prism reproduce NAME [--seeds N] [--smoke] [--out DIR] [key=value ...]`` runs the claim's seeds as one
``prism train -m seed=0,1,...`` sweep (a subprocess, so Hydra's launchers apply: ``hydra/launcher=joblib``
among the extra overrides runs them in parallel), reads each job's ``result.json`` through
:mod:`prism.framework.sweep`, and writes ``reproduce.json`` and ``reproduce.md`` (one table row) into the
output folder: mean ± sample std, the 95 % bootstrap confidence interval of the mean, the published number, a
verdict, wall time, hardware, code version (git SHA and dirty flag) and a hash of the resolved config.

The verdict compares the confidence interval ``[lo, hi]`` with the expected band ``[value - tolerance,
value + tolerance]`` (:func:`verdict`): ``pass`` when the interval lies inside the band (ends included),
``fail`` when it lies entirely outside, ``inconclusive`` when it straddles an edge of the band. With one
seed there is no interval: the verdict is that of the single value (``[x, x]``) and the note says so.

A claim whose ``requires`` paths (data folders) are missing is ``skipped`` with the reason, never run on
something else and never given a number. The command exits 0 when every claim passed or was skipped, 1
otherwise, 2 on bad input (unknown claim, invalid ``claim.yaml``).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from prism.framework.errors import ConfigError, UnknownNameError
from prism.framework.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_ci

#: The repository root (holds ``experiments/``, ``conf/`` and ``.git`` in a checkout).
REPO_DIR = Path(__file__).resolve().parent.parent
CLAIM_FILE = "claim.yaml"
HARDWARE_CLASS = re.compile(r"^(cpu|1 GPU|[2-9]\d* GPUs|\d{2,} GPUs)$")
#: Required top-level keys of ``claim.yaml`` (``requires`` and ``note`` are optional).
CLAIM_KEYS = ("description", "command", "metric", "published", "expected", "seeds", "hardware", "wall_s",
              "smoke")
#: Required keys of the ``smoke`` profile (``seeds``, ``requires`` and ``note`` are optional).
PROFILE_KEYS = ("command", "expected", "wall_s")


@dataclass
class Profile:
    """How to run a claim: overrides after the claim's ``command``, seeds, expected band, wall time."""

    command: list[str]
    expected: float
    tolerance: float
    seeds: int
    wall_s: float
    hardware: str
    requires: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def band(self) -> tuple[float, float]:
        return self.expected - self.tolerance, self.expected + self.tolerance


@dataclass
class Claim:
    """One ``experiments/<name>/claim.yaml``: the full reproduction and its smoke profile."""

    name: str
    path: Path
    description: str
    metric: str
    published: float | None
    published_source: str
    full: Profile
    smoke: Profile

    def profile(self, smoke: bool) -> Profile:
        return self.smoke if smoke else self.full


# -- claims ---------------------------------------------------------------------------------------------
def experiments_dir() -> Path:
    """Where claims live: ``$PRISM_EXPERIMENTS``, else the repository's ``experiments/``."""
    return Path(os.environ.get("PRISM_EXPERIMENTS") or REPO_DIR / "experiments")


def claim_names(root: Path) -> list[str]:
    """Every claim under ``root``: the folder of each ``claim.yaml``, relative to ``root``, sorted."""
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(CLAIM_FILE))


def _key(data: dict, key: str, path: Path, kind: type | tuple[type, ...], prefix: str = "") -> Any:
    """``data[key]``, checked present and of ``kind``; else a one-line :class:`ConfigError` naming file and key."""
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(f"{path}: missing key '{prefix}{key}'")
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{path}: key '{prefix}{key}' must be a {names}, got {value!r}")
    return value


def _overrides(data: dict, path: Path, prefix: str) -> list[str]:
    command = _key(data, "command", path, list, prefix)
    bad = [c for c in command if not isinstance(c, str) or "=" not in c]
    if bad:
        raise ConfigError(f"{path}: key '{prefix}command' must list key=value overrides, got {bad[0]!r}")
    return command


def _profile(data: dict, path: Path, prefix: str, hardware: str, seeds: int | None = None) -> Profile:
    """A profile from the claim's top level (``prefix=''``) or its ``smoke`` mapping (``prefix='smoke.'``)."""
    expected = _key(data, "expected", path, dict, prefix)
    value = _key(expected, "value", path, float, f"{prefix}expected.")
    tolerance = _key(expected, "tolerance", path, float, f"{prefix}expected.")
    if tolerance < 0:
        raise ConfigError(f"{path}: key '{prefix}expected.tolerance' must be >= 0, got {tolerance}")
    n = seeds if seeds is not None else _key(data, "seeds", path, int, prefix)
    if n < 1:
        raise ConfigError(f"{path}: key '{prefix}seeds' must be >= 1, got {n}")
    requires = data.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ConfigError(f"{path}: key '{prefix}requires' must be a list of paths, got {requires!r}")
    return Profile(command=_overrides(data, path, prefix), expected=value, tolerance=tolerance, seeds=n,
                   wall_s=_key(data, "wall_s", path, float, prefix), hardware=hardware, requires=requires,
                   note=str(data.get("note", "")))


def parse_claim(name: str, path: Path, data: Any) -> Claim:
    """Validate the mapping read from ``path``; every problem is a one-line :class:`ConfigError`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(CLAIM_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(CLAIM_KEYS) - {"requires", "note"})
    if unknown:
        close = difflib.get_close_matches(unknown[0], CLAIM_KEYS, n=1)
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    hardware = _key(data, "hardware", path, str)
    if not HARDWARE_CLASS.match(hardware):
        raise ConfigError(f"{path}: key 'hardware' must be 'cpu', '1 GPU' or 'N GPUs', got {hardware!r}")
    published = _key(data, "published", path, dict)
    value = published.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ConfigError(f"{path}: key 'published.value' must be a number or null, got {value!r}")
    smoke = _key(data, "smoke", path, dict)
    smoke_seeds = smoke.get("seeds", 2)
    if isinstance(smoke_seeds, bool) or not isinstance(smoke_seeds, int):
        raise ConfigError(f"{path}: key 'smoke.seeds' must be a int, got {smoke_seeds!r}")
    full = _profile(data, path, "", hardware)
    smoke_profile = _profile(smoke, path, "smoke.", "cpu", smoke_seeds)
    smoke_profile.command = full.command + smoke_profile.command  # the same code, made small
    if "requires" not in smoke:  # the smoke run reads the full run's data unless it says otherwise
        smoke_profile.requires = list(full.requires)
    return Claim(name=name, path=path, description=_key(data, "description", path, str),
                 metric=_key(data, "metric", path, str), published=None if value is None else float(value),
                 published_source=_key(published, "source", path, str, "published."), full=full, smoke=smoke_profile)


def load_claim(name: str, root: Path | None = None) -> Claim:
    """The claim ``name`` under ``root``; an unknown name fails with the closest names."""
    root = root or experiments_dir()
    path = root / name / CLAIM_FILE
    if not path.is_file():
        names = claim_names(root) if root.is_dir() else []
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown claim {name!r} (no {path}).{hint} Claims: {', '.join(names) or 'none'} "
                               f"(`prism reproduce --list`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    return parse_claim(name, path, data)


def missing_requirements(profile: Profile, cwd: Path) -> list[str]:
    """The profile's ``requires`` paths (relative to ``cwd``, where ``prism train`` runs) that do not exist."""
    return [r for r in profile.requires if not (cwd / os.path.expandvars(r)).exists()]


# -- statistics -----------------------------------------------------------------------------------------
def verdict(interval: tuple[float, float], band: tuple[float, float]) -> str:
    """``pass`` when ``interval`` lies inside ``band`` (ends included), ``fail`` when entirely outside it,
    ``inconclusive`` when it straddles one of the band's ends."""
    (lo, hi), (band_lo, band_hi) = interval, band
    if band_lo <= lo and hi <= band_hi:
        return "pass"
    if hi < band_lo or lo > band_hi:
        return "fail"
    return "inconclusive"


def summarize(values: list[float], band: tuple[float, float]) -> dict[str, Any]:
    """Mean, sample std, 95 % bootstrap CI and the verdict of ``values`` against ``band``."""
    ci = bootstrap_ci(values)
    return {"n": len(values), "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "ci95": list(ci), "verdict": verdict(ci, band),
            "note": "1 seed: no interval, verdict on the single value" if len(values) == 1 else ""}


# -- running and collecting -----------------------------------------------------------------------------
def train_command(profile: Profile, seeds: int, runs_dir: Path, extra: list[str]) -> list[str]:
    """The ``prism train -m`` sweep over ``seed=0..seeds-1`` into ``runs_dir`` (``extra`` overrides last)."""
    seed_values = ",".join(str(s) for s in range(seeds))
    return [sys.executable, "-m", "prism.framework", "train", "-m", *profile.command, f"seed={seed_values}",
            f"hydra.sweep.dir={runs_dir}", *extra]


def run_seeds(command: list[str], log_path: Path, cwd: Path) -> int:
    """Run the sweep in a subprocess (its output to ``log_path``): one Hydra multirun, so any launcher works,
    and the jobs' ``result.json`` files are the only record read back."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        return subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def collect(runs_dir: Path, metric: str) -> list[dict[str, Any]]:
    """One record per job of the sweep: seed, directory, status, the metric's final value, wall times."""
    from prism.framework.sweep import read_jobs

    runs = []
    for job in read_jobs(runs_dir):
        result, metrics = job.result, job.result.get("metrics", {})
        if job.status == "completed" and metric not in metrics:
            raise ConfigError(f"metric {metric!r} is not among the runs' metrics ({', '.join(sorted(metrics))}): "
                              f"fix 'metric' in the claim")
        value = _finite(metrics.get(metric))
        status = job.status if value is not None or job.status != "completed" else "non-finite metric"
        seed = job.overrides.get("seed", "")
        runs.append({"seed": int(seed) if seed.isdigit() else seed, "dir": str(job.dir), "status": status,
                     "value": value,
                     "wall_s": result.get("wall_s"), "process_s": result.get("process_s"),
                     "devices": result.get("devices"), "device_kind": result.get("device_kind"),
                     "error": job.error if status != "completed" else ""})
    return runs


def config_hash(job_dir: Path) -> str:
    """SHA-256 (first 12 hex digits) of the job's resolved config without ``seed``: one value for all seeds."""
    cfg = yaml.safe_load((Path(job_dir) / ".hydra" / "config.yaml").read_text()) or {}
    cfg.pop("seed", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def code_version(repo: Path = REPO_DIR) -> dict[str, Any]:
    """``{"sha", "dirty"}`` of the git checkout the code runs from (None for both outside a checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        except OSError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain") if sha else None
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def measured_hardware(runs: list[dict[str, Any]]) -> str | None:
    """``"1x NVIDIA H200"``-style description from the completed runs (None when none completed)."""
    kinds = sorted({f"{r['devices']}x {r['device_kind']}" for r in runs if r["status"] == "completed"})
    return ", ".join(kinds) or None


# -- one claim --------------------------------------------------------------------------------------------
def base_record(claim: Claim, smoke: bool, seeds: int) -> dict[str, Any]:
    """What ``reproduce.json`` says about the claim before anything runs."""
    profile = claim.profile(smoke)
    return {"name": claim.name, "profile": "smoke" if smoke else "full", "description": claim.description,
            "claim_file": str(claim.path), "metric": claim.metric, "command": profile.command,
            "seeds": list(range(seeds)),
            "expected": {"value": profile.expected, "tolerance": profile.tolerance, "band": list(profile.band)},
            "published": {"value": claim.published, "source": claim.published_source},
            "hardware": {"claim": profile.hardware, "measured": None},
            "wall_s": {"expected_per_seed": profile.wall_s, "per_seed_mean": None, "total": None},
            "code": code_version(), "config_hash": None, "runs": [], "n": 0, "mean": None, "std": None,
            "ci95": None, "ci_method": f"percentile bootstrap of the mean, {BOOTSTRAP_RESAMPLES} resamples, "
                                       f"numpy default_rng({BOOTSTRAP_SEED})",
            "verdict": None, "note": profile.note,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def _add_note(record: dict[str, Any], note: str) -> None:
    record["note"] = "; ".join(n for n in (record["note"], note) if n)


def evaluate_runs(record: dict[str, Any], runs: list[dict[str, Any]], band: tuple[float, float]) -> None:
    """Fill the statistics and the verdict; a run that did not complete makes the verdict ``error``."""
    record["runs"] = runs
    values = [r["value"] for r in runs if r["status"] == "completed"]
    walls = [r["wall_s"] for r in runs if isinstance(r["wall_s"], int | float)]
    record["wall_s"]["per_seed_mean"] = float(np.mean(walls)) if walls else None
    record["hardware"]["measured"] = measured_hardware(runs)
    if values:
        stats = summarize(values, band)
        _add_note(record, stats.pop("note"))
        record.update(stats)
    failed = [r for r in runs if r["status"] != "completed"]
    if failed or not runs:
        record["verdict"] = "error"
        detail = f"seed {failed[0]['seed']}: {failed[0]['status']}: {failed[0]['error']}" if failed else "no jobs"
        _add_note(record, f"{len(failed)} of {len(runs)} run(s) did not complete ({detail})")
    if record["hardware"]["measured"] and record["hardware"]["claim"] == "cpu" \
            and "cpu" not in record["hardware"]["measured"]:
        _add_note(record, "claim is for a CPU, ran on " + record["hardware"]["measured"])


def reproduce_claim(claim: Claim, smoke: bool, seeds: int | None, out: Path, extra: list[str],
                    cwd: Path) -> dict[str, Any]:
    """Run (or skip) one claim into ``out``; returns the record written to ``out/reproduce.json``."""
    profile = claim.profile(smoke)
    seeds = seeds or profile.seeds
    record = base_record(claim, smoke, seeds)
    missing = missing_requirements(profile, cwd)
    if missing:
        record["verdict"] = "skipped"
        _add_note(record, f"missing {', '.join(missing)} (relative to {cwd})")
    else:
        runs_dir = out / "runs"
        if runs_dir.exists() and any(runs_dir.iterdir()):
            raise ConfigError(f"{runs_dir} already holds a reproduction's runs: choose another --out")
        command = train_command(profile, seeds, runs_dir, extra)
        print(f"reproduce {claim.name} ({record['profile']}, {seeds} seed(s), ~{profile.wall_s:.0f} s per seed): "
              f"log in {out / 'train.log'}", file=sys.stderr, flush=True)
        start = time.monotonic()
        run_seeds(command, out / "train.log", cwd)
        record["wall_s"]["total"] = round(time.monotonic() - start, 2)
        record["command"] = command[3:]  # from "train" on, without the interpreter
        runs = collect(runs_dir, claim.metric) if runs_dir.is_dir() else []
        evaluate_runs(record, runs, profile.band)
        done = [r for r in runs if r["status"] == "completed"]
        record["config_hash"] = config_hash(Path(done[0]["dir"])) if done else None
    write_record(record, out)
    return record


# -- reports --------------------------------------------------------------------------------------------
TABLE_HEADER = ("| claim | profile | metric | mean ± std (seeds) | 95% CI | expected | published | verdict | "
                "wall per seed (all) | hardware | code | config |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def markdown_row(record: dict[str, Any]) -> str:
    """One table row (:data:`TABLE_HEADER`) for a ``reproduce.json`` record."""
    mean = "–" if record["mean"] is None else \
        f"{_num(record['mean'])} ± {_num(record['std'])} ({record['n']})"
    ci = "–" if record["ci95"] is None else f"[{_num(record['ci95'][0])}, {_num(record['ci95'][1])}]"
    expected = f"{_num(record['expected']['value'])} ± {_num(record['expected']['tolerance'])}"
    published = f"{_num(record['published']['value'])} ({record['published']['source']})"
    verdict_text = f"**{record['verdict']}**" + (f" ({record['note']})" if record["note"] else "")
    wall = record["wall_s"]
    wall_text = "–" if wall["total"] is None else \
        f"{_num(wall['per_seed_mean'])} s ({wall['total']:.0f} s; expected {_num(wall['expected_per_seed'])} s)"
    hardware = record["hardware"]["measured"] or "–"
    if record["hardware"]["measured"]:
        hardware += f" (claim: {record['hardware']['claim']})"
    code = record["code"]
    code_text = "–" if not code["sha"] else f"`{code['sha'][:10]}`" + (" dirty" if code["dirty"] else "")
    config = f"`{record['config_hash']}`" if record["config_hash"] else "–"
    cells = [record["name"], record["profile"], record["metric"], mean, ci, expected, published, verdict_text,
             wall_text, hardware, code_text, config]
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def write_record(record: dict[str, Any], out: Path) -> None:
    """``out/reproduce.json`` (the record) and ``out/reproduce.md`` (the table with its one row)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "reproduce.md").write_text(f"{TABLE_HEADER}\n{markdown_row(record)}\n")


def list_claims(root: Path, cwd: Path) -> str:
    """``prism reproduce --list``: each claim's metric, numbers, seeds, hardware and wall time, both profiles."""
    lines = []
    for name in claim_names(root):
        claim = load_claim(name, root)
        full, smoke = claim.full, claim.smoke
        published = "none" if claim.published is None else _num(claim.published)
        lines.append(f"{name}: {claim.description}")
        lines.append(f"    {claim.metric}: expected {_num(full.expected)} ± {_num(full.tolerance)}, published "
                     f"{published} ({claim.published_source}); {full.seeds} seeds on {full.hardware}, "
                     f"~{full.wall_s:.0f} s each" + _missing_text(full, cwd))
        lines.append(f"    smoke: expected {_num(smoke.expected)} ± {_num(smoke.tolerance)}; {smoke.seeds} seed(s) "
                     f"on cpu, ~{smoke.wall_s:.0f} s each" + _missing_text(smoke, cwd))
    return "\n".join(lines) if lines else f"no claims under {root} (no */{CLAIM_FILE})"


def _missing_text(profile: Profile, cwd: Path) -> str:
    missing = missing_requirements(profile, cwd)
    return f" [skipped here: missing {', '.join(missing)}]" if missing else ""


# -- the command ----------------------------------------------------------------------------------------
def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options, claim names (``ns.names``) and the extra ``key=value`` overrides given to every run."""
    parser = argparse.ArgumentParser(prog="prism reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="claims (experiments/<name>/claim.yaml), then key=value overrides")
    parser.add_argument("--all", action="store_true", help="every claim")
    parser.add_argument("--list", action="store_true", help="list the claims and exit")
    parser.add_argument("--smoke", action="store_true", help="the claims' smoke profiles (seconds on a CPU)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default: the claim's)")
    parser.add_argument("--out", help="output folder (default: outputs/reproduce/DATE_TIME)")
    parser.add_argument("--experiments", help="folder of claims (default: $PRISM_EXPERIMENTS or experiments/)")
    parser.add_argument("--table", action="store_true",
                        help="write the claims table into README.md and experiments/README.md from the recorded "
                             "experiments/*/reproduce.json files, and exit")
    parser.add_argument("--check-table", action="store_true",
                        help="exit 1 when the docs' claims table differs from the recorded reproductions")
    ns = parser.parse_args(args)
    extra = [a for a in ns.names if "=" in a]
    ns.names = [a for a in ns.names if "=" not in a]
    if ns.seeds is not None and ns.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {ns.seeds}")
    if not (ns.list or ns.table or ns.check_table) and bool(ns.names) == ns.all:
        raise ConfigError("give claim names or --all (not both); `prism reproduce --list` lists the claims")
    return ns, extra


def main(args: list[str]) -> int:
    """``prism reproduce NAME... | --all [--smoke] [--seeds N] [--out DIR] [key=value ...]`` and ``--list``."""
    ns, extra = parse_args(args)
    root, cwd = Path(ns.experiments) if ns.experiments else experiments_dir(), Path.cwd()
    if ns.list:
        print(list_claims(root, cwd))
        return 0
    if ns.table or ns.check_table:
        from prism.framework import claims_table

        if ns.check_table:
            stale = claims_table.stale_docs(REPO_DIR, root)
            for doc in stale:
                print(f"{doc}: the claims table differs from the recorded reproductions: run `prism reproduce "
                      f"--table`", file=sys.stderr)
            return 1 if stale else 0
        changed = claims_table.write_docs(REPO_DIR, root)
        print(f"claims table written into {', '.join(map(str, changed))}" if changed else "claims table up to date")
        return 0
    names = claim_names(root) if ns.all else ns.names
    claims = [load_claim(name, root) for name in names]  # every claim checked before anything runs
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = Path(ns.out or Path("outputs") / "reproduce" / stamp).absolute()
    records = [reproduce_claim(c, ns.smoke, ns.seeds, out / c.name, extra, cwd) for c in claims]
    table = "\n".join([TABLE_HEADER, *(markdown_row(r) for r in records)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out}/reproduce.md and {len(records)} reproduce.json file(s) under {out}")
    return 0 if all(r["verdict"] in ("pass", "skipped") for r in records) else 1
