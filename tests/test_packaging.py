"""A wheel of the repository carries the framework, the built-in plugins, ``conf/`` and the ``prism`` script,
and works from outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, run_prism
from omegaconf import OmegaConf

#: A preset added to the copy that is built, to check that nested ``conf/<group>/*.yaml`` files are packaged.
PROBE_PRESET = "conf/model/packaging_probe.yaml"


def _checkout_copy(dest: Path) -> None:
    """The files a fresh checkout would have: tracked plus untracked-but-not-ignored (no build/, outputs/)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packaging")
    source = root / "src"
    _checkout_copy(source)
    (source / PROBE_PRESET).parent.mkdir(parents=True, exist_ok=True)
    (source / PROBE_PRESET).write_text("defaults:\n  - simple_cnn\n  - _self_\nwidths: [4]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-input",
         "--disable-pip-version-check", "-w", str(root / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (built,) = (root / "dist").glob("prism_vision-*.whl")
    return built


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    return dest


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    for required in ("prism/conf/config.yaml", "prism/framework/train.py", "prism/framework/cli.py",
                     "prism/plugins/models/simple_cnn.py",
                     "prism/plugins/optimizers/optax_optimizers.py", f"prism/{PROBE_PRESET}"):
        assert required in names, f"{required} missing from {wheel.name}"
    top_level = ("tests/", "outputs/", "multirun/", "framework/", "plugins/", "conf/")  # only prism/... is installed
    assert not [n for n in names if n.startswith(top_level)]
    assert "[console_scripts]\nprism = prism.framework.cli:main" in scripts


def test_unpacked_wheel_finds_its_conf_dir(unpacked, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    code = ("import prism.framework as framework; from prism.framework.config import CONF_DIR; "
            "print(framework.__file__); print(CONF_DIR); print((CONF_DIR / 'config.yaml').exists())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)

    assert proc.returncode == 0, proc.stderr
    framework_file, conf_dir, exists = proc.stdout.split()
    assert Path(framework_file).is_relative_to(unpacked)  # the wheel's copy, not the editable repo
    assert Path(conf_dir) == unpacked / "prism" / "conf"
    assert exists == "True"


def test_unpacked_wheel_composes_the_default_job(unpacked, tmp_path):
    proc = run_prism("train", "--cfg", "job", "model=packaging_probe", cwd=tmp_path,
                     env={"PYTHONPATH": str(unpacked)})

    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.dataset.name == "digits"  # conf/config.yaml's defaults, read from the wheel
    assert cfg.checkpoint.best_metric == "eval/accuracy"
    assert cfg.model.name == "simple_cnn"
    assert list(cfg.model.widths) == [4]  # the preset that exists only in the wheel


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject lists the installed packages by name (package-dir maps prism.X onto X/): a new sub-package
    folder that is not listed would be missing from wheels."""
    import tomllib

    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {installed: REPO / folder for installed, folder in setuptools_cfg["package-dir"].items()}
    def owner(folder):  # the most specific mapping holding the folder (framework/hydra_launcher is its own)
        return max((r for r in folders.values() if folder.is_relative_to(r)), key=lambda r: len(r.parts))

    on_disk = {
        ".".join((installed, *init.parent.relative_to(root).parts))
        for installed, root in folders.items()
        for init in root.rglob("__init__.py")
        if "build" not in init.relative_to(root).parts and owner(init.parent) == root
    }
    assert on_disk == set(setuptools_cfg["packages"])
