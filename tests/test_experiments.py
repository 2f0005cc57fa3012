"""Experiment presets compose against the current plugins and schema (a stale preset fails here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prism.framework.config import CONF_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg.model.name and cfg.dataset.name and cfg.train.batch_size > 0


def test_fashion_mnist_experiment_and_its_recorded_result():
    cfg = compose(["+experiment=fashion_mnist_cnn"])
    assert cfg.dataset.name == "fashion_mnist_local" and list(cfg.model.widths) == [64, 128, 256]
    assert [op["name"] for op in cfg.augment.ops] == ["hflip"]
    recorded = Path(__file__).resolve().parents[1] / "experiments" / "fashion_mnist_cnn" / "result.json"
    result = json.loads(recorded.read_text())
    assert result["status"] == "completed" and result["metrics"]["eval/accuracy"] >= 0.90
