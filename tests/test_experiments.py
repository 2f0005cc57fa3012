"""Experiment presets compose against the current plugins and schema (a stale preset fails here).

Whether the experiments still reproduce is ``prism reproduce --all --smoke`` (tests/test_reproduce.py runs the
machinery; each claim's smoke profile is checked to compose there)."""

from __future__ import annotations

import pytest

from prism.framework.config import CONF_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes(name):
    cfg = compose([f"+experiment={name}"])
    assert cfg.model.name and cfg.dataset.name and cfg.train.batch_size > 0
