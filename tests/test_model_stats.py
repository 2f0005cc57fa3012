"""``prism list model``: parameters and forward GFLOPs per model, computed by ``--stats`` and cached on disk.

Only the default ``simple_cnn`` is summarised here (deep models take seconds each on a CPU); the numbers themselves
are checked against torchvision in ``tests/test_models.py::test_model_summary_resnet18``.
"""

from __future__ import annotations

import json
import re

import jax
from conftest import run_prism

from prism.framework import model_summary as ms


def test_cached_summary_computes_once_then_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRISM_CACHE_DIR", str(tmp_path))
    assert ms.cached_summary("simple_cnn", compute=False) is None
    fresh = ms.model_summary("simple_cnn")

    first = ms.cached_summary("simple_cnn")

    assert first == {**fresh, "model": "simple_cnn"}
    stored = json.loads((tmp_path / ms.STATS_FILE).read_text())
    assert list(stored.values()) == [first]
    key = ms.summary_key("simple_cnn")
    stored[key]["params"] = -1  # a cache hit is served from the file, not recomputed
    (tmp_path / ms.STATS_FILE).write_text(json.dumps(stored))
    assert ms.cached_summary("simple_cnn")["params"] == -1
    monkeypatch.setattr(jax, "__version__", "0.0.0")  # another JAX may count differently: another key
    assert ms.summary_key("simple_cnn") != key and ms.cached_summary("simple_cnn", compute=False) is None


def test_list_models_shows_cached_stats_and_computes_them_on_request(tmp_path):
    env = {"PRISM_CACHE_DIR": str(tmp_path / "cache")}
    row = re.compile(r"^  simple_cnn\s+(\S+) params\s+(\S+) GFLOPs  Small conv-BN-ReLU classifier", re.MULTILINE)

    plain = run_prism("list", "model", "simple*", cwd=tmp_path, env=env)
    assert plain.returncode == 0, plain.stderr
    assert row.search(plain.stdout).groups() == ("-", "-")
    assert "`prism list model simple* --stats` computes them" in plain.stdout
    assert not (tmp_path / "cache").exists()  # listing never computes

    computed = run_prism("list", "model", "simple*", "--stats", cwd=tmp_path, env=env)
    assert computed.returncode == 0, computed.stderr
    expected = ms.model_summary("simple_cnn")
    assert row.search(computed.stdout).groups() == (f"{expected['params']:,}", f"{expected['gflops']:.2f}")
    assert "not computed" not in computed.stdout
    assert "models (1):" in computed.stdout  # the pattern keeps the other models out

    again = run_prism("list", "model", "simple*", cwd=tmp_path, env=env)  # served from the cache
    assert row.search(again.stdout).groups() == (f"{expected['params']:,}", f"{expected['gflops']:.2f}")


def test_stats_flag_is_for_models_only(tmp_path):
    proc = run_prism("list", "optimizer", "--stats", cwd=tmp_path)
    assert proc.returncode == 2
    assert "prism: error: --stats applies to models" in proc.stderr
