"""``prism reproduce``: claims, statistics, verdicts, bad input, and real smoke runs that pass and fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from prism.framework.errors import ConfigError, UnknownNameError
from prism.framework.reproduce import (
    bootstrap_ci,
    claim_names,
    experiments_dir,
    load_claim,
    markdown_row,
    summarize,
    verdict,
)
from tests.conftest import REPO, run_prism

CLAIM = {
    "description": "digits, tiny", "command": [], "metric": "eval/accuracy",
    "published": {"value": None, "source": "none"}, "expected": {"value": 0.98, "tolerance": 0.02},
    "seeds": 3, "hardware": "cpu", "wall_s": 40,
    "smoke": {"command": ["train.steps=150", "train.batch_size=32", "train.eval_every=150", "logging.progress=false",
                          "checkpoint.enabled=false"],
              "expected": {"value": 0.75, "tolerance": 0.25}, "seeds": 2, "wall_s": 6},
}


def write_claim(root: Path, name: str, **changes) -> Path:
    data = json.loads(json.dumps(CLAIM))
    for key, value in changes.items():
        target = data
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        if value is None and last not in ("value",):
            target.pop(last)
        else:
            target[last] = value
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "claim.yaml").write_text(yaml.safe_dump(data))
    return root / name / "claim.yaml"


# -- statistics and verdicts, by hand ---------------------------------------------------------------------
def test_verdict_hand_cases():
    band = (0.90, 0.94)
    assert verdict((0.91, 0.93), band) == "pass"
    assert verdict((0.90, 0.94), band) == "pass"  # the band's ends are inside
    assert verdict((0.95, 0.97), band) == "fail"  # entirely above
    assert verdict((0.80, 0.899), band) == "fail"  # entirely below
    assert verdict((0.89, 0.92), band) == "inconclusive"  # straddles the lower end
    assert verdict((0.93, 0.95), band) == "inconclusive"  # straddles the upper end
    assert verdict((0.85, 0.99), band) == "inconclusive"  # wider than the band


def test_bootstrap_ci_hand_cases():
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    # two values: a resample's mean is a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4 -> the 2.5 % and 97.5 %
    # quantiles of 10,000 resamples are a and b
    assert bootstrap_ci([0.2, 0.4]) == pytest.approx((0.2, 0.4))
    values = [0.91, 0.92, 0.93, 0.94, 0.95]
    lo, hi = bootstrap_ci(values)
    assert lo < np.mean(values) < hi and 0.91 <= lo and hi <= 0.95
    assert bootstrap_ci(values) == (lo, hi)  # seeded: the same interval every time
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_summarize_one_seed_says_there_is_no_interval():
    s = summarize([0.95], (0.9, 1.0))
    assert s["ci95"] == [0.95, 0.95] and s["std"] is None and s["verdict"] == "pass"
    assert "1 seed: no interval" in s["note"]
    assert summarize([0.5], (0.9, 1.0))["verdict"] == "fail"


def test_a_wrong_claim_fails_and_a_wide_spread_is_inconclusive():
    assert summarize([0.97, 0.98, 0.975], (0.50, 0.60))["verdict"] == "fail"
    wide = summarize([0.70, 0.98, 0.99, 0.72], (0.90, 1.00))
    assert wide["verdict"] == "inconclusive" and wide["ci95"][0] < 0.90 < wide["ci95"][1]
    assert wide["std"] == pytest.approx(np.std([0.70, 0.98, 0.99, 0.72], ddof=1))


# -- claims ---------------------------------------------------------------------------------------------
def test_every_committed_claim_loads_and_composes():
    from prism.framework.config import compose

    names = claim_names(experiments_dir())
    assert {"digits_cnn", "fashion_mnist_cnn", "unet_isbi2012", "yolov3_raccoon",
            "ssl_fashion_mnist/simclr", "ssl_fashion_mnist/byol"} <= set(names)
    for name in names:
        claim = load_claim(name)
        for profile in (claim.full, claim.smoke):
            assert profile.band[0] <= profile.expected <= profile.band[1]
            compose(profile.command)  # a stale override fails here, not in the middle of a reproduction


@pytest.mark.parametrize("change, message", [
    ({"metric": None}, "missing key 'metric'"),
    ({"expected.tolerance": None}, "missing key 'expected.tolerance'"),
    ({"smoke.expected": None}, "missing key 'smoke.expected'"),
    ({"seeds": "three"}, "key 'seeds' must be a int"),
    ({"hardware": "a GPU"}, "key 'hardware' must be 'cpu', '1 GPU' or 'N GPUs'"),
    ({"command": ["model"]}, "must list key=value overrides"),
    ({"expected.tolerance": -1}, "must be >= 0"),
    ({"metrik": "x"}, "unknown key 'metrik' (did you mean 'metric'?)"),
])
def test_invalid_claim_names_file_and_key(tmp_path, change, message):
    path = write_claim(tmp_path, "bad", **change)
    with pytest.raises(ConfigError) as info:
        load_claim("bad", tmp_path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_unknown_claim_suggests_close_names(tmp_path):
    write_claim(tmp_path, "digits_cnn")
    with pytest.raises(UnknownNameError, match="Did you mean: digits_cnn"):
        load_claim("digit_cnn", tmp_path)


def test_markdown_row_of_a_skipped_claim():
    from prism.framework.reproduce import base_record

    record = base_record(load_claim("digits_cnn"), smoke=False, seeds=3)
    record.update(verdict="skipped", note="missing /data")
    row = markdown_row(record)
    assert row.count("|") == 13 and "**skipped** (missing /data)" in row


# -- the command ----------------------------------------------------------------------------------------
def test_cli_bad_input_is_one_line(tmp_path):
    write_claim(tmp_path, "digits_cnn")
    write_claim(tmp_path, "broken", **{"smoke.wall_s": None})
    for args, expected in [(["digit_cnn"], "unknown claim 'digit_cnn'"),
                           (["broken", "--smoke"], "smoke.wall_s"),
                           ([], "give claim names or --all")]:
        proc = run_prism("reproduce", *args, "--experiments", str(tmp_path), cwd=tmp_path, timeout=120)
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_list():
    proc = run_prism("reproduce", "--list", cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digits_cnn: default job" in proc.stdout and "smoke: expected" in proc.stdout
    assert "unet_isbi2012" in proc.stdout and "eval/pixel_error" in proc.stdout


def test_smoke_reproduction_trains_passes_and_a_wrong_claim_fails(tmp_path):
    """Real runs: the digits smoke profile over 2 seeds passes; the same runs against a wrong number fail;
    a claim whose data is missing is skipped, never run. Exit 1 because one claim failed."""
    claims, out = tmp_path / "claims", tmp_path / "out"
    write_claim(claims, "digits")
    write_claim(claims, "wrong", **{"smoke.expected": {"value": 0.2, "tolerance": 0.05}, "smoke.seeds": 1})
    write_claim(claims, "absent", **{"smoke.requires": [str(tmp_path / "no_such_data")]})
    proc = run_prism("reproduce", "--all", "--smoke", "--experiments", str(claims), "--out", str(out),
                     cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    good = json.loads((out / "digits" / "reproduce.json").read_text())
    assert good["verdict"] == "pass" and good["n"] == 2 and good["profile"] == "smoke"
    values = [r["value"] for r in good["runs"]]
    assert [r["seed"] for r in good["runs"]] == [0, 1] and len(set(values)) == 2  # two seeds, two trainings
    assert good["mean"] == pytest.approx(np.mean(values)) and 0.5 <= good["ci95"][0] <= good["ci95"][1] <= 1.0
    assert good["code"]["sha"] and isinstance(good["code"]["dirty"], bool) and len(good["config_hash"]) == 12
    assert good["hardware"]["measured"].endswith("x cpu") and good["wall_s"]["total"] > 0
    for run in good["runs"]:
        result = json.loads((Path(run["dir"]) / "result.json").read_text())
        assert result["metrics"]["eval/accuracy"] == run["value"]
    wrong = json.loads((out / "wrong" / "reproduce.json").read_text())
    assert wrong["verdict"] == "fail" and "1 seed: no interval" in wrong["note"]
    absent = json.loads((out / "absent" / "reproduce.json").read_text())
    assert absent["verdict"] == "skipped" and "no_such_data" in absent["note"] and not absent["runs"]
    table = (out / "reproduce.md").read_text()
    assert table.count("\n| ") == 3 and "**fail**" in table and "**pass**" in table
    assert (out / "digits" / "reproduce.md").read_text().splitlines()[-1] == markdown_row(good)
