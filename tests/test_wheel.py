"""A real wheel of the repository, pip-installed (not editable) into a fresh virtual environment that cannot see
the repository, trains from another directory.

How the environment gets its dependencies without a download: the venv is made by the test interpreter's
Python with ``--without-pip`` and without ``--system-site-packages`` (the dependencies live in the repository's
``.venv``, not system-wide), the wheel is installed into it with ``pip --python VENV/bin/python install
--no-deps``, and only *then* a ``.pth`` file in the new venv's site-packages adds the test interpreter's
site-packages (jax, flax, hydra, ...) at the end of ``sys.path``. A ``.pth`` line only appends a directory:
the ``.pth`` files inside it are not run, so the repository's editable-install finder (its
``__editable__...pth``) stays off and ``prism`` can only come from the wheel; the installed copy's
``.dist-info`` comes first on the path, so ``importlib.metadata`` sees the wheel's entry points. The ``.pth``
is written after the install so pip never sees (nor tries to replace) the editable install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from conftest import FAST, read_result
from test_packaging import _checkout_copy

pytestmark = pytest.mark.slow

#: Runs in the installed environment: registers everything, counting each registration, and reports where
#: things were imported from.
CHECK = textwrap.dedent("""\
    import collections, json, sys
    from prism.framework import registry
    counts = collections.Counter()
    add = registry.Registry.add
    def counting_add(self, entry, **kw):
        counts[f"{self.kind}:{entry.name}"] += 1
        return add(self, entry, **kw)
    registry.Registry.add = counting_add
    import prism.framework
    from prism.framework.commands import command_failures, load_commands
    from prism.framework.config import CONF_DIR
    from prism.framework.plugins import load_plugins, plugin_failures
    load_plugins()
    load_commands()
    load_plugins(); load_commands()  # again: nothing more may register
    files = collections.Counter(getattr(m, "__file__", None) for m in list(sys.modules.values()))
    print(json.dumps({
        "framework": prism.framework.__file__,
        "conf": str(CONF_DIR),
        "twice": [k for k, n in counts.items() if n != 1],
        "registered": sum(counts.values()),
        "names": {kind: r.names() for kind, r in registry.REGISTRIES.items()},
        "modules": sorted({e.module for r in registry.REGISTRIES.values() for e in r.entries()}),
        "module_files": sorted({sys.modules[e.module].__file__ for r in registry.REGISTRIES.values()
                                for e in r.entries()}),
        "aliases": [f for f, n in files.items() if f and n > 1 and "prism" in f],
        "top_level": sorted({k.split(".")[0] for k in sys.modules} & {"framework", "plugins", "conf"}),
        "failures": {**plugin_failures(), **command_failures()},
    }))
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The new venv's Python, with the wheel built from a checkout copy installed in it."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    _checkout_copy(source)
    pip = [sys.executable, "-m", "pip", "--no-input", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"pip wheel failed:\n{built.stdout}\n{built.stderr}"
    (wheel,) = (root / "dist").glob("prism_vision-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, f"pip install failed:\n{install.stdout}\n{install.stderr}"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "prism" / "framework" / "cli.py").is_file()  # a real install, not a link to the repository
    assert not list(site.glob("__editable__*"))
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_prism_test_dependencies.pth").write_text("".join(f"{path}\n" for path in deps))
    return python


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_installed_wheel_trains_from_another_directory(installed, tmp_path):
    run_dir = tmp_path / "run"
    quick = [o for o in FAST if not o.startswith("train.steps=")]
    proc = subprocess.run(
        [str(installed), "-m", "prism.framework", "train", "train.steps=3", "train.eval_every=3", *quick,
         "logging.tensorboard=false", "logging.plots=false", "checkpoint.async_save=false",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, proc.stderr[-4000:]
    result = read_result(run_dir)
    assert result["status"] == "completed"
    assert result["steps"] == 3


def test_installed_wheel_imports_from_site_packages_and_registers_once(installed, tmp_path):
    proc = subprocess.run([str(installed), "-c", CHECK], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    site = Path(report["framework"]).parents[2]
    repo = Path(__file__).resolve().parents[1]

    assert site.name == "site-packages" and site.is_relative_to(installed.parent.parent)
    assert not Path(report["framework"]).is_relative_to(repo)
    assert Path(report["conf"]) == site / "prism" / "conf"
    assert report["failures"] == {}
    assert report["twice"] == []  # no plugin module ran its registrations twice (e.g. under two import names)
    assert report["registered"] == sum(len(names) for names in report["names"].values())
    for kind, names in report["names"].items():
        assert names and len(names) == len(set(names)), kind
    assert {"simple_cnn", "resnet18"} <= set(report["names"]["model"])
    assert {"train", "eval", "list"} <= set(report["names"]["command"])
    assert all(m.startswith("prism.") for m in report["modules"]), report["modules"]
    assert all(Path(f).is_relative_to(site / "prism") for f in report["module_files"])
    assert report["aliases"] == []  # no prism file imported as two modules
    assert report["top_level"] == []  # nothing imported as framework.*, plugins.* or conf.*
