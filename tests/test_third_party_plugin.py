"""A real third-party plugin package (tests/plugin_package) installed with pip and used through the CLI."""

from __future__ import annotations

import os
import re

import pytest
from conftest import EXAMPLE_PACKAGE, FAST, REPO, install_example_package, read_result, run_prism
from omegaconf import OmegaConf

PACKAGE_DIR = EXAMPLE_PACKAGE
PLUGIN_FILE = PACKAGE_DIR / "prism_example_plugin" / "__init__.py"
README = REPO / "README.md"
FAST_NO_WIDTHS = [o for o in FAST if not o.startswith("model.widths=")]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    """pip-install the package into a fresh target dir; the environment that puts it on the path."""
    target = install_example_package(tmp_path_factory.mktemp("third_party"))
    assert (target / "prism_example_plugin" / "__init__.py").read_text() == PLUGIN_FILE.read_text()
    entry_points = next(target.glob("prism_example_plugin-*.dist-info")) / "entry_points.txt"
    assert "[prism.plugins]\nexample = prism_example_plugin" in entry_points.read_text()
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def test_plugin_file_is_short():
    assert len(PLUGIN_FILE.read_text().splitlines()) <= 50


def test_list_shows_the_installed_model(plugin_env, tmp_path):
    proc = run_prism("list", "model", cwd=tmp_path, env=plugin_env)

    assert proc.returncode == 0, proc.stderr
    # name, [parameters, GFLOPs (cached or "-", see test_model_stats.py),] description
    description = re.search(r"^  tiny_mlp\s+(?:\S+ params\s+\S+ GFLOPs  )?(.*)$", proc.stdout, re.MULTILINE)
    assert description and description[1] == "Two-layer perceptron on flattened pixels.", proc.stdout
    assert re.search(r"^  simple_cnn\s", proc.stdout, re.MULTILINE)
    assert "failed to import" not in proc.stderr


def test_train_the_installed_model(plugin_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_prism("train", "model=tiny_mlp", "model.hidden=16", *FAST_NO_WIDTHS, f"hydra.run.dir={run_dir}",
                     cwd=tmp_path, env=plugin_env)

    assert proc.returncode == 0, proc.stderr[-4000:]
    result = read_result(run_dir)
    assert result["status"] == "completed"
    assert result["steps"] == 20
    # flatten(8x8x1 digits) -> Linear(64, 16) -> ReLU -> Linear(16, 10): the hidden width really was 16
    assert result["params"] == 64 * 16 + 16 + 16 * 10 + 10
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.model.name == "tiny_mlp"
    assert saved.model.hidden == 16
    # the plugin's dataclass is the whole model schema, plus the keys every model has (config.COMMON_FIELDS)
    assert set(saved.model) == {"name", "pretrained", "hidden"}


def test_unknown_key_of_the_plugin_config_is_rejected(plugin_env, tmp_path):
    proc = run_prism("train", "model=tiny_mlp", "model.widths=[8]", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, env=plugin_env)

    assert proc.returncode != 0
    assert "widths" in proc.stderr and "TinyMLPConfig" in proc.stderr


def test_readme_shows_the_plugin_verbatim():
    readme = README.read_text() if README.exists() else ""
    if not re.search(r"^## Writing a plugin", readme, re.MULTILINE):
        pytest.skip("README not written yet")
    assert PLUGIN_FILE.read_text().strip() in readme
