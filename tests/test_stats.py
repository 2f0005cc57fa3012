"""Statistics of seeds (framework/stats.py) against independent references, and their place in sweep-report.

References: Welch's t statistic and Welch–Satterthwaite degrees of freedom written out in NumPy (only the t
distribution's tail from SciPy); sample sizes from Cohen's power tables as G*Power reproduces them (two-sided
two-sample t-test, alpha 0.05, power 0.8: d = 0.5 -> 64, 0.8 -> 26, 1.0 -> 17, 2.0 -> 6 per group).
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from prism.framework.stats import power_two_sample, seeds_needed, welch_t_test
from prism.framework.sweep_report import build_report, write_report


def _welch_numpy(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return t, 2 * scipy_stats.t.sf(abs(t), df)


def test_welch_t_test_matches_the_formula():
    rng = np.random.default_rng(3)
    for na, nb in ((3, 3), (3, 7), (10, 4)):
        a, b = rng.normal(0.9, 0.01, na), rng.normal(0.88, 0.03, nb)
        assert welch_t_test(a, b) == pytest.approx(_welch_numpy(a, b), rel=1e-10)
    assert welch_t_test([0.9], [0.8, 0.7]) is None  # one seed: no variance, no test
    assert welch_t_test([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0)
    assert welch_t_test([0.6, 0.6], [0.5, 0.5]) == (math.inf, 0.0)


@pytest.mark.parametrize("effect, per_group", [(0.5, 64), (0.8, 26), (1.0, 17), (2.0, 6)])
def test_seeds_needed_matches_power_tables(effect, per_group):
    c = 1 / math.sqrt(2)  # two values m ± c have sample std 1: the difference of means is the effect size
    assert seeds_needed([effect - c, effect + c], [-c, c]) == per_group
    assert power_two_sample(effect, per_group) >= 0.8 > power_two_sample(effect, per_group - 1)


def test_seeds_needed_edge_cases():
    assert seeds_needed([0.9], [0.8, 0.7]) is None
    assert seeds_needed([0.5, 0.6], [0.6, 0.5]) is None  # no difference to detect
    assert seeds_needed([0.6, 0.6], [0.5, 0.5]) == 2  # no spread: any two seeds tell them apart
    assert seeds_needed([0.0, 1.0], [0.001, 1.001]) is None  # more than MAX_SEEDS


def _job(sweep, num, lr, seed, accuracy, time_to=None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr={lr}\n- seed={seed}\n")
    (job / ".hydra" / "config.yaml").write_text("checkpoint:\n  best_metric: eval/accuracy\n  best_mode: max\n")
    result = {"status": "completed", "metrics": {"eval/accuracy": accuracy}, "steps": 10, "wall_s": 1.0}
    if time_to is not None:
        result["time_to"] = time_to
    (job / "result.json").write_text(json.dumps(result))


def test_sweep_report_compares_each_setting_with_the_best(tmp_path):
    """Three learning rates over seeds: the report's p-values and seeds-needed equal the formulas on the
    same numbers, the best row says so, a 2-seed setting is flagged, and time_to columns appear."""
    sweep = tmp_path / "sweep"
    values = {"0.1": [0.91, 0.93, 0.92], "0.01": [0.88, 0.90, 0.87], "0.001": [0.80, 0.84]}
    num = 0
    for lr, accs in values.items():
        for seed, acc in enumerate(accs):
            reached = {"0.9": {"from_start_s": 10.0 + num, "from_first_step_s": 4.0 + num, "step": 5, "value": acc}
                       if acc >= 0.9 else None}
            _job(sweep, num, lr, seed, acc, reached)
            num += 1

    report = build_report(sweep)
    assert report.best["params"] == {"optimizer.lr": "0.1"}
    write_report(report)
    with (sweep / "report_seeds.csv").open() as f:
        rows = {r["optimizer.lr"]: r for r in csv.DictReader(f)}
    assert rows["0.1"]["p vs best (Welch)"] == "best"
    for lr in ("0.01", "0.001"):
        t, p = _welch_numpy(values["0.1"], values[lr])
        assert float(rows[lr]["p vs best (Welch)"]) == pytest.approx(p, rel=1e-9)
        assert int(rows[lr]["seeds needed"]) == seeds_needed(values["0.1"], values[lr])
        lo, hi = float(rows[lr]["eval/accuracy ci95 lo"]), float(rows[lr]["eval/accuracy ci95 hi"])
        assert min(values[lr]) <= lo <= np.mean(values[lr]) <= hi <= max(values[lr])
    markdown = (sweep / "report.md").read_text()
    assert "(n<3)" in next(line for line in markdown.splitlines() if line.startswith("| 0.001 |"))
    assert "(n<3)" not in next(line for line in markdown.splitlines() if line.startswith("| 0.01 |"))

    with (sweep / "report.csv").open() as f:
        jobs = {r["job"]: r for r in csv.DictReader(f)}
    assert jobs["0"]["time to 0.9 (s from start)"] == "10.0"
    assert jobs["0"]["time to 0.9 (s from first step)"] == "4.0"
    assert jobs["3"]["time to 0.9 (s from start)"] == ""  # 0.88 never reached 0.9
