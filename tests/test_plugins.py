"""Plugin discovery: every built-in module under ``plugins/`` loads, and a third-party plugin that raises on
import is reported by name with its error while everything else still loads (checked in a real subprocess
with a real installed distribution declaring ``prism.plugins`` entry points)."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_prism

from prism.framework.config import SELECTED_KINDS, group_options
from prism.framework.plugins import (
    ENTRY_POINT_GROUP,
    _builtin_module_names,
    load_plugins,
    plugin_failures,
)
from prism.framework.registry import DATASETS, MODELS, OBJECTIVES, OPTIMIZERS, REGISTRIES, SCHEDULES, TASKS

BROKEN_MODULE = '''\
"""A plugin whose dependency is not installed: importing it raises before it registers anything."""

from prism.framework.registry import MODELS

import prism_dependency_that_is_not_installed  # noqa: F401  (raises ModuleNotFoundError)


@MODELS.register("broken_net", description="Never registered.")
def build(cfg=None, *, data, rngs):
    raise AssertionError("unreachable")
'''

GOOD_MODULE = '''\
"""A plugin whose entry point is a callable: prism calls it once after importing the module."""

from prism.framework.registry import MODELS


def register():
    @MODELS.register("entry_point_net", description="Registered by an entry-point callable.")
    def build(*, data, rngs):
        raise NotImplementedError
'''


def test_builtin_modules_are_all_imported_without_failures():
    load_plugins()
    names = _builtin_module_names()
    on_disk = {  # every module file and sub-package under plugins/, except private ones
        ".".join(("prism", *(p.parent if p.name == "__init__.py" else p.with_suffix("")).relative_to(REPO).parts))
        for p in (REPO / "plugins").rglob("*.py")
        if p.parent != REPO / "plugins" or p.name != "__init__.py"
        if p.name == "__init__.py" or not p.name.startswith("_")
    }
    assert set(names) == on_disk
    assert {"prism.plugins.models.simple_cnn", "prism.plugins.optimizers.optax_optimizers",
            "prism.plugins.datasets.digits"} <= on_disk
    assert not [n for n in names if n not in sys.modules]
    assert plugin_failures() == {}


@pytest.mark.parametrize(
    ("registry", "name", "module"),
    [
        (MODELS, "simple_cnn", "prism.plugins.models.simple_cnn"),
        (OPTIMIZERS, "lars", "prism.plugins.optimizers.optax_optimizers"),
        (OPTIMIZERS, "adamw", "prism.plugins.optimizers.optax_optimizers"),
        (SCHEDULES, "cosine", "prism.plugins.optimizers.schedules"),
        (DATASETS, "digits", "prism.plugins.datasets.digits"),
        (OBJECTIVES, "supervised", "prism.plugins.objectives.supervised"),
        (TASKS, "classification", "prism.plugins.tasks.classification"),
    ],
)
def test_builtin_names_resolve_to_their_modules(registry, name, module):
    entry = registry.get(name)
    assert entry.module == module
    assert entry.description  # every built-in describes itself for `prism list`


def test_every_selectable_plugin_is_a_config_group_option():
    for kind in SELECTED_KINDS:
        names = REGISTRIES[kind].names()
        assert names, f"no {kind} registered"
        assert set(names) <= set(group_options(kind))


def _install_fake_distribution(site: Path) -> None:
    """A real (unpacked) installed distribution: two packages plus a ``.dist-info`` with entry points."""
    (site / "prism_broken_plugin").mkdir()
    (site / "prism_broken_plugin" / "__init__.py").write_text(BROKEN_MODULE)
    (site / "prism_good_plugin").mkdir()
    (site / "prism_good_plugin" / "__init__.py").write_text(GOOD_MODULE)
    dist_info = site / "prism_test_plugins-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: prism-test-plugins\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        broken = prism_broken_plugin
        good = prism_good_plugin:register
        """))


@pytest.fixture(scope="module")
def broken_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("site")
    _install_fake_distribution(site)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("prism: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_broken_plugin_is_reported_and_others_still_load(broken_env, tmp_path):
    proc = run_prism("list", "model", cwd=tmp_path, env=broken_env)

    assert proc.returncode == 0, proc.stderr
    # rows: name, [parameters, GFLOPs (cached or "-", see test_model_stats.py),] description
    listed = dict(re.findall(r"^  (\S+)\s+(?:\S+ params\s+\S+ GFLOPs  )?(.*)$", proc.stdout, re.MULTILINE))
    assert "simple_cnn" in listed  # built-ins still load
    assert listed.get("entry_point_net") == "Registered by an entry-point callable."  # so do other entry points
    assert "broken_net" not in listed
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning: plugin ")]
    assert len(warning) == 1, proc.stderr
    assert "broken = prism_broken_plugin" in warning[0]
    assert "ModuleNotFoundError: No module named 'prism_dependency_that_is_not_installed'" in warning[0]
    assert re.search(r"prism_broken_plugin[/\\]__init__\.py:5\)", warning[0])  # where it raised
    assert "Traceback" not in proc.stderr


def test_train_with_a_name_from_the_broken_plugin_names_the_failure(broken_env, tmp_path):
    proc = run_prism("train", "model=broken_net", "hydra.run.dir=" + str(tmp_path / "run"), cwd=tmp_path,
                     env=broken_env)

    assert proc.returncode == 2, proc.stderr
    error = _error_line(proc.stderr)
    assert "unknown model 'broken_net'" in error
    assert "prism_broken_plugin" in error
    assert "ModuleNotFoundError: No module named 'prism_dependency_that_is_not_installed'" in error
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # rejected before Hydra starts a run
