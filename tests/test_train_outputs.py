"""What a run leaves in its directory: the resolved Hydra config, ``metrics.jsonl``, TensorBoard events,
PNG curves, checkpoints and ``result.json``; and the default job's accuracy (slow)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import yaml
from conftest import FAST, REPO, read_result, run_prism

from prism.framework.logging import read_metrics

TRAIN_SIZE = 1437  # digits: 1,797 images, 20% held out


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli_run")
    proc = run_prism("train", *FAST, f"hydra.run.dir={run_dir}", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_resolved_config_is_saved(cli_run):
    config = yaml.safe_load((cli_run / ".hydra" / "config.yaml").read_text())
    assert config["train"]["steps"] == 20 and config["train"]["batch_size"] == 32
    assert config["model"]["name"] == "simple_cnn" and config["model"]["widths"] == [8, 16]
    assert config["dataset"]["name"] == "digits"
    overrides = yaml.safe_load((cli_run / ".hydra" / "overrides.yaml").read_text())
    assert "model.widths=[8,16]" in overrides


def test_metrics_jsonl_has_train_and_eval_records(cli_run):
    records = read_metrics(cli_run)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in train] == [10, 20]  # log_every=10
    assert [r["step"] for r in evals] == [10, 20]  # eval_every=10
    for r in train:
        assert {"train/loss", "train/accuracy", "train/grad_norm", "train/lr", "train/images_per_s"} <= r.keys()
        assert np.isfinite(r["train/loss"]) and r["train/loss"] > 0
    for r in evals:
        assert {"eval/accuracy", "eval/loss", "eval/top5"} <= r.keys()
        assert 0.0 <= r["eval/accuracy"] <= r["eval/top5"] <= 1.0
    for r in records:
        assert r["epoch"] == pytest.approx(r["step"] * 32 / TRAIN_SIZE, abs=1e-4)
        assert isinstance(r["time"], float)
    assert read_result(cli_run)["metrics"] == {k: v for k, v in evals[-1].items() if k.startswith("eval/")}


def test_tensorboard_events_hold_the_scalars(cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((cli_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = EventAccumulator(str(cli_run / "tensorboard"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "eval/accuracy", "eval/loss"} <= set(scalars)
    jsonl = {r["step"]: r for r in read_metrics(cli_run)
             if "train/loss" in r}
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [10, 20]
    for e in events:
        np.testing.assert_allclose(e.value, jsonl[e.step]["train/loss"], rtol=1e-6)


def test_curves_png_is_a_valid_image(cli_run):
    data = (cli_run / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    import matplotlib.image

    image = matplotlib.image.imread(cli_run / "curves.png")
    assert image.shape[:2] == (height, width)
    assert image.std() > 0.01  # not a blank canvas


def test_checkpoints_and_result(cli_run):
    steps = sorted(int(p.name) for p in (cli_run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20]  # saved at each evaluation; keep=2 (+ best, one of them)
    for step in steps:
        assert (cli_run / "checkpoints" / str(step) / "state").is_dir()
    assert not [p for p in (cli_run / "checkpoints").iterdir() if "tmp" in p.name]
    result = read_result(cli_run)
    assert result["status"] == "completed"
    assert result["steps"] == result["total_steps"] == 20
    assert set(result["metrics"]) == {"eval/accuracy", "eval/loss", "eval/top5"}
    assert isinstance(result["wall_s"], float) and result["wall_s"] > 0
    assert result["best_step"] in steps
    assert result["devices"] == 4 and result["processes"] == 1
    assert result["params"] == 3 * 3 * 1 * 8 + 3 * 3 * 8 * 16 + 2 * (8 + 16) + 16 * 10 + 10


@pytest.mark.slow
def test_default_job_reaches_95_percent(tmp_path):
    """The real default job (30 epochs of digits, the default CNN): no overrides but the run directory."""
    run_dir = tmp_path / "default"
    proc = run_prism("train", f"hydra.run.dir={run_dir}", cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(run_dir)
    print(f"default job: {result['steps']} steps, wall_s={result['wall_s']}, metrics={result['metrics']}")
    assert result["status"] == "completed"
    assert result["metrics"]["eval/accuracy"] >= 0.95


def test_non_finite_metrics_are_written_as_strict_json(tmp_path):
    """metrics.jsonl (and result.json, through the same helper) never holds the invalid literals NaN/Infinity."""
    import json

    from prism.framework.logging import MetricLogger, json_safe, read_metrics, to_json

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {text!r}"))

    logger = MetricLogger(tmp_path, total_steps=2, start_step=0, steps_per_epoch=1.0, progress=False,
                          tensorboard=False)
    logger.write(1, {"eval/loss": float("nan"), "train/grad_norm": float("inf"), "train/lr": 0.1})
    logger.close()
    record = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["eval/loss"] == "nan" and record["train/grad_norm"] == "inf" and record["train/lr"] == 0.1
    assert np.isnan(float(read_metrics(tmp_path)[0]["eval/loss"]))  # float() reads the strings back
    nested = {"metrics": {"a": float("-inf")}, "runs": [1.5, float("nan")], "n": 3}
    assert strict(to_json(nested)) == json_safe(nested) == {"metrics": {"a": "-inf"}, "runs": [1.5, "nan"], "n": 3}


def test_a_resumed_logger_drops_the_records_written_after_its_checkpoint(tmp_path):
    from prism.framework.logging import MetricLogger, read_metrics

    first = MetricLogger(tmp_path, total_steps=9, start_step=0, steps_per_epoch=3.0, progress=False,
                         tensorboard=False)
    for step in range(1, 8):  # the attempt was killed after logging step 7; its last checkpoint is step 5
        first.write(step, {"train/loss": float(step)})
    first.close()
    resumed = MetricLogger(tmp_path, total_steps=9, start_step=5, steps_per_epoch=3.0, progress=False,
                           tensorboard=False)
    for step in (6, 7, 8, 9):
        resumed.write(step, {"train/loss": 10.0 + step})
    resumed.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["train/loss"] for r in records] == [1, 2, 3, 4, 5, 16, 17, 18, 19]
