"""Collect the stage outputs of ``benchmarks/e2e_gpu.sh`` into ``summary.json`` and ``summary.md``.

    python benchmarks/e2e_summary.py SRC [SRC ...] --out OUT

Each SRC is either the job's work folder (raw stage outputs, layout below) or the OUT folder of an earlier call
(its ``stages.json``); later SRCs replace a stage only where they hold one, so the stages of several device
calls merge: ``python benchmarks/e2e_summary.py call1/ call2/ call3/ --out merged/``. Writes OUT/stages.json
(everything parsed, per stage), OUT/summary.json and OUT/summary.md. A stage that is missing or failed never
stops the others: its section of summary.json is null (nothing ran) or holds nulls (it ran, a value is
missing), and ``errors`` says why.

summary.json::

    {"gpu": str,
     "airbench": {"acc_mean", "acc_std", "train_s_mean", "runs": [...]},
     "prism_airbench94": {"acc_mean", "acc_std", "train_s_mean", "process_s_mean", "runs": [...]},
     "resnet18": {"prism": {"acc", "train_s", "process_s", "loop_img_s"}, "torch": {"acc", "train_s"},
                  "prism_synthetic_step_img_s": float},
     "errors": [str, ...]}

Accuracies are fractions (0.94); std is the sample standard deviation (null below 2 runs).

Work-folder layout (what ``e2e_gpu.sh`` writes; every ``process.json`` is ``{"process_s", "rc", "limit_s",
"timed_out"}`` of one process, measured by the script)::

    env/gpu.txt, env/versions.txt
    prepare/extract.json               {"extract_s", "rc", "train_images", "test_images"}
    prepare/pt_report.json             benchmarks/cifar10_prepare.py --report
    airbench/runs.jsonl                benchmarks/e2e_airbench.py, one line per run (and the warm-up)
    airbench/process.json
    prism94/dataset/process.json       the TFDS preparation of the JPEG folder (prism bench data), if run
    prism94/seed<N>/result.json        prism train's result.json (hydra.run.dir), with process.json
    resnet18/prism/result.json         with process.json
    torch/result.json                  benchmarks/e2e_torch_resnet18.py --out, with process.json
    synthetic/bench.json               prism bench train --out, with process.json
    notes.txt                          lines the script wrote (stages skipped, time limits)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Any

STAGES = ("prepare", "airbench", "prism94", "resnet18_prism", "torch", "synthetic")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _process(folder: Path) -> dict | None:
    return _json(folder / "process.json")


def _process_errors(name: str, proc: dict | None) -> list[str]:
    if proc is None:
        return []
    if proc.get("timed_out"):
        return [f"{name}: killed at its time limit ({proc.get('limit_s')} s)"]
    if proc.get("rc") not in (0, None):
        return [f"{name}: exit code {proc.get('rc')} (see its log.txt in logs.tgz)"]
    return []


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _prism_run(folder: Path, name: str) -> tuple[dict, list[str]]:
    """One prism train process: result.json's figures and the script's process wall."""
    result, proc = _json(folder / "result.json"), _process(folder)
    errors = _process_errors(name, proc)
    run = {"status": _get(result, "status"), "acc": _get(result, "metrics", "eval/accuracy"),
           "train_s": _get(result, "timing", "train_s"), "process_s": _get(proc, "process_s"),
           "result_process_s": _get(result, "process_s"), "time_to": _get(result, "time_to"),
           "loop_img_s": _get(result, "loop_images_per_s"), "timing": _get(result, "timing"),
           "steps": _get(result, "steps"), "rc": _get(proc, "rc")}
    if result is None:
        errors.append(f"{name}: no result.json")
    elif result.get("status") != "completed":
        errors.append(f"{name}: status {result.get('status')!r}: {result.get('error', '')}".rstrip(": "))
    else:
        for key in ("acc", "train_s"):
            if run[key] is None:
                field = "metrics.eval/accuracy" if key == "acc" else "timing.train_s"
                errors.append(f"{name}: result.json has no {field}")
    if result is not None and result.get("error"):
        run["error"] = result["error"]
    return run, errors


def collect(work: Path) -> dict:
    """The stages found in a work folder (None for each one absent), with ``stage_errors`` and ``notes``."""
    stages: dict[str, Any] = {"gpu": _text(work / "env" / "gpu.txt"), "versions": _text(work / "env" / "versions.txt"),
                              **{s: None for s in STAGES}}
    errors: dict[str, list[str]] = {}

    def err(stage: str, *messages: str) -> None:
        errors.setdefault(stage, []).extend(messages)

    notes = _text(work / "notes.txt")
    stages["notes"] = notes.splitlines() if notes else []

    if (work / "prepare").is_dir():
        extract = _json(work / "prepare" / "extract.json")
        report = _json(work / "prepare" / "pt_report.json")
        stages["prepare"] = {"extract": extract, "pt": report, "pt_process": _process(work / "prepare")}
        err("prepare", *_process_errors("prepare (cifar10_prepare.py)", _process(work / "prepare")))
        if extract is None:
            err("prepare", "prepare: no extract.json")
        elif extract.get("rc") not in (0, None):
            err("prepare", f"prepare: tar exit code {extract.get('rc')}")

    if (work / "airbench").is_dir():
        runs, warmup = [], None
        path = work / "airbench" / "runs.jsonl"
        for line in (path.read_text().splitlines() if path.is_file() else []):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("run") == "warmup":
                warmup = entry
            else:
                runs.append(entry)
                if entry.get("error"):
                    err("airbench", f"airbench run {entry.get('run')}: {entry['error']}")
        proc = _process(work / "airbench")
        stages["airbench"] = {"runs": runs, "warmup": warmup, "process": proc}
        err("airbench", *_process_errors("airbench", proc))
        if not runs:
            err("airbench", "airbench: no runs recorded")

    if (work / "prism94").is_dir():
        runs = []
        seeds = sorted((d for d in (work / "prism94").iterdir() if re.fullmatch(r"seed\d+", d.name)),
                       key=lambda d: int(d.name[4:]))
        for d in seeds:
            run, errs = _prism_run(d, f"prism94 {d.name}")
            runs.append({"seed": int(d.name[4:]), **run})
            err("prism94", *errs)
        dataset = _process(work / "prism94" / "dataset")
        stages["prism94"] = {"runs": runs, "dataset_prepare": dataset}
        err("prism94", *_process_errors("prism94 dataset preparation", dataset))
        if not runs:
            err("prism94", "prism94: no runs")

    if (work / "resnet18" / "prism").is_dir():
        run, errs = _prism_run(work / "resnet18" / "prism", "resnet18 prism")
        stages["resnet18_prism"] = run
        err("resnet18_prism", *errs)
        if run["loop_img_s"] is None and run["status"] == "completed":
            err("resnet18_prism", "resnet18 prism: result.json has no loop_images_per_s")

    if (work / "torch").is_dir():
        result, proc = _json(work / "torch" / "result.json"), _process(work / "torch")
        stages["torch"] = {**(result or {"acc": None, "train_s": None}), "process": proc}
        err("torch", *_process_errors("torch resnet18", proc))
        if result is None:
            err("torch", "torch resnet18: no result.json")

    if (work / "synthetic").is_dir():
        bench, proc = _json(work / "synthetic" / "bench.json") or {}, _process(work / "synthetic")
        stages["synthetic"] = {k: bench.get(k) for k in ("img_s", "img_s_median_step", "step_ms_median", "compile_s",
                                                         "compile_cached", "batch_size", "steps", "mfu",
                                                         "device_kind")}
        stages["synthetic"]["process"] = proc
        err("synthetic", *_process_errors("synthetic (prism bench train)", proc))
        if not bench:
            err("synthetic", "synthetic: no bench.json")
    stages["stage_errors"] = {k: v for k, v in errors.items() if v}
    return stages


def load(src: Path) -> dict:
    """Stages of one SRC: its stages.json when it has one, else parsed from the work-folder layout."""
    saved = _json(src / "stages.json")
    return saved if isinstance(saved, dict) else collect(src)


def merge(parts: list[dict]) -> dict:
    """Later parts replace a stage where they hold it (with that stage's errors); notes add up."""
    merged: dict[str, Any] = {"gpu": None, "versions": None, **{s: None for s in STAGES}, "notes": [],
                              "stage_errors": {}}
    for part in parts:
        for key in ("gpu", "versions"):
            merged[key] = merged[key] or part.get(key)
        stage_errors = part.get("stage_errors") or {}
        for stage in STAGES:
            if part.get(stage) is not None:
                merged[stage] = part[stage]
                merged["stage_errors"][stage] = stage_errors.get(stage, [])
        merged["notes"] += part.get("notes", [])
    merged["stage_errors"] = {k: v for k, v in merged["stage_errors"].items() if v}
    return merged


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else None


def _std(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return statistics.stdev(values) if len(values) >= 2 else None


def summarize(stages: dict) -> dict:
    """summary.json from merged stages."""
    errors = [e for stage in STAGES for e in stages.get("stage_errors", {}).get(stage, [])]
    gpu = stages.get("gpu")
    if gpu is None:
        errors.append("gpu: no env/gpu.txt (nvidia-smi)")
    else:
        gpu = gpu.splitlines()[0].split(",")[0].strip()
    summary: dict[str, Any] = {"gpu": gpu, "airbench": None, "prism_airbench94": None, "resnet18": None}

    ab = stages.get("airbench")
    if ab is not None:
        runs = [r for r in ab.get("runs", []) if r.get("acc") is not None]
        summary["airbench"] = {"acc_mean": _mean([r["acc"] for r in runs]), "acc_std": _std([r["acc"] for r in runs]),
                               "train_s_mean": _mean([r.get("train_s") for r in runs]), "runs": ab.get("runs", [])}
    else:
        errors.append("airbench: stage not run (no output)")

    p94 = stages.get("prism94")
    if p94 is not None:
        runs = p94.get("runs", [])
        ok = [r for r in runs if r.get("status") == "completed"]
        summary["prism_airbench94"] = {
            "acc_mean": _mean([r.get("acc") for r in ok]), "acc_std": _std([r.get("acc") for r in ok]),
            "train_s_mean": _mean([r.get("train_s") for r in ok]),
            "process_s_mean": _mean([r.get("process_s") for r in ok]),
            "runs": [{k: r.get(k) for k in ("seed", "status", "acc", "train_s", "process_s", "time_to", "timing",
                                             "error") if k in r} for r in runs]}
    else:
        errors.append("prism94: stage not run (no output)")

    rp, tr, sy = stages.get("resnet18_prism"), stages.get("torch"), stages.get("synthetic")
    for name, part in (("resnet18_prism", rp), ("torch", tr), ("synthetic", sy)):
        if part is None:
            errors.append(f"{name}: stage not run (no output)")
    if rp is not None or tr is not None or sy is not None:
        summary["resnet18"] = {
            "prism": None if rp is None else {"acc": rp.get("acc"), "train_s": rp.get("train_s"),
                                              "process_s": rp.get("process_s"), "loop_img_s": rp.get("loop_img_s")},
            "torch": None if tr is None else {"acc": tr.get("acc"), "train_s": tr.get("train_s")},
            "prism_synthetic_step_img_s": None if sy is None else sy.get("img_s"),
        }
    summary["errors"] = errors
    return summary


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def _f(value: Any, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _pct(value: Any) -> str:
    return _f(value, "{:.2%}")


def gates(summary: dict) -> dict[str, float | None]:
    """The ratios the issue's gates read."""
    ab, p94 = summary.get("airbench") or {}, summary.get("prism_airbench94") or {}
    rn = summary.get("resnet18") or {}
    rp, tr = rn.get("prism") or {}, rn.get("torch") or {}
    acc_diff = (p94["acc_mean"] - ab["acc_mean"]) if p94.get("acc_mean") is not None and \
        ab.get("acc_mean") is not None else None
    return {"airbench94_acc_diff_pp": None if acc_diff is None else 100 * acc_diff,
            "airbench94_train_s_ratio": _ratio(p94.get("train_s_mean"), ab.get("train_s_mean")),
            "airbench94_process_s_over_airbench_train_s": _ratio(p94.get("process_s_mean"), ab.get("train_s_mean")),
            "resnet18_loop_over_synthetic": _ratio(rp.get("loop_img_s"), rn.get("prism_synthetic_step_img_s")),
            "resnet18_train_s_ratio": _ratio(rp.get("train_s"), tr.get("train_s"))}


def markdown(summary: dict, stages: dict) -> str:
    g = gates(summary)
    ab, p94 = summary.get("airbench") or {}, summary.get("prism_airbench94") or {}
    rn = summary.get("resnet18") or {}
    rp, tr = rn.get("prism") or {}, rn.get("torch") or {}

    def acc(part: dict) -> str:
        n = len([r for r in part.get("runs", []) if r.get("acc") is not None])
        if part.get("acc_mean") is None:
            return "-"
        return f"{part['acc_mean']:.2%} ± {_f(part.get('acc_std'), '{:.2%}', 'n/a')} (n={n})"

    lines = [f"# End-to-end: prism against airbench94 and PyTorch ({summary.get('gpu') or 'GPU unknown'})", "",
             "| gate | value | from |", "|---|---|---|",
             f"| airbench94 accuracy, prism − airbench | {_f(g['airbench94_acc_diff_pp'], '{:+.2f} pp')} | "
             f"prism {acc(p94)} vs airbench {acc(ab)} |",
             f"| airbench94 train wall, prism / airbench | {_f(g['airbench94_train_s_ratio'], '{:.2f}x')} | "
             f"prism timing.train_s {_f(p94.get('train_s_mean'))} s vs airbench "
             f"{_f(ab.get('train_s_mean'), '{:.3f}')} s (means) |",
             f"| airbench94 process wall (prism) / airbench train | "
             f"{_f(g['airbench94_process_s_over_airbench_train_s'], '{:.1f}x')} | "
             f"prism process {_f(p94.get('process_s_mean'), '{:.1f}')} s (mean) |",
             f"| ResNet-18 training loop / synthetic step (img/s) | "
             f"{_f(g['resnet18_loop_over_synthetic'], '{:.3f}')} | "
             f"loop {_f(rp.get('loop_img_s'), '{:,.0f}')} vs synthetic "
             f"{_f(rn.get('prism_synthetic_step_img_s'), '{:,.0f}')} |",
             f"| ResNet-18 train wall, prism / PyTorch | {_f(g['resnet18_train_s_ratio'], '{:.2f}x')} | "
             f"prism {_f(rp.get('train_s'))} s (acc {_pct(rp.get('acc'))}) vs torch {_f(tr.get('train_s'))} s "
             f"(acc {_pct(tr.get('acc'))}) |", "",
             "Train seconds: airbench, its own CUDA-event total (whitening init + epochs + TTA evaluation; the "
             "per-epoch evaluations it prints are outside it); prism, result.json `timing.train_s`; PyTorch, the "
             "synced wall of the training loop (batch assembly and augmentation on the GPU included; cuDNN "
             "warm-up steps before it). Process seconds: the whole `prism train` process, timed by e2e_gpu.sh.", ""]

    if ab.get("runs"):
        warm = (stages.get("airbench") or {}).get("warmup")
        lines += ["## airbench94 (airbench 0.1.8, its own timing)", "",
                  "After one `airbench.warmup94()` call (not counted)." if warm else "No warm-up call.", "",
                  "| run | acc (TTA) | val acc | train s (airbench) | call s |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('run')} | {_pct(r.get('acc'))} | {_pct(r.get('val_acc'))} | "
                  f"{_f(r.get('train_s'), '{:.3f}')} | {_f(r.get('call_s'), '{:.1f}')} |" for r in ab["runs"]]
        lines.append("")
    if p94.get("runs"):
        lines += ["## prism +experiment=cifar10_airbench94", "",
                  "| seed | status | acc | train s | process s | compile s | time to 0.90 (from start / first step) |",
                  "|---|---|---|---|---|---|---|"]
        for r in p94["runs"]:
            t90 = (r.get("time_to") or {}).get("0.9") or (r.get("time_to") or {}).get("0.90")
            t90s = "-" if not t90 else f"{_f(t90.get('from_start_s'), '{:.1f}')} / {_f(t90.get('from_first_step_s'))} s"
            compile_s = (r.get("timing") or {}).get("compile_s")
            lines.append(f"| {r.get('seed')} | {r.get('status') or 'no result'} | {_pct(r.get('acc'))} | "
                         f"{_f(r.get('train_s'))} | {_f(r.get('process_s'), '{:.1f}')} | {_f(compile_s, '{:.1f}')} | "
                         f"{t90s} |")
        lines.append("")
    prep = stages.get("prepare") or {}
    if prep:
        ex, pt = prep.get("extract") or {}, prep.get("pt") or {}
        lines += ["## Data", "",
                  f"- JPEG archive extracted in {_f(ex.get('extract_s'), '{:.1f}')} s "
                  f"({ex.get('train_images', '?')} train, {ex.get('test_images', '?')} test images)",
                  f"- airbench tensors (cifar10_prepare.py): {_f(pt.get('total_s'), '{:.1f}')} s", ""]
    t = stages.get("torch") or {}
    if t.get("steps"):
        lines += [f"PyTorch: {'torch.compile' if t.get('compile') else 'eager'}, {t.get('steps')} steps of "
                  f"{t.get('batch_size')}, {_f(t.get('img_s'), '{:,.0f}')} img/s, decode "
                  f"{_f(t.get('decode_s'), '{:.1f}')} s (not timed), torch {t.get('torch')}.", ""]
    if summary.get("errors") or stages.get("notes"):
        lines += ["## Errors and notes", ""] + [f"- {e}" for e in summary.get("errors", [])] + \
                 [f"- note: {n}" for n in stages.get("notes", [])] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", nargs="+", type=Path, help="work folders or earlier OUT folders (stages.json)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    stages = merge([load(s) for s in args.src])
    summary = summarize(stages)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stages.json").write_text(json.dumps(stages, indent=2))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary, stages)
    (args.out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
