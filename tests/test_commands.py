"""``prism <command>`` as an extension point: the ``COMMANDS`` registry, its built-ins, commands registered at
run time, and commands that installed packages add through the ``prism.commands`` entry point group (a fake
distribution with good and broken entry points, and the real example package in tests/plugin_package)."""

from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import pytest
from conftest import install_example_package, run_prism

from prism.framework.cli import main, usage
from prism.framework.commands import ENTRY_POINT_GROUP
from prism.framework.errors import ConfigError
from prism.framework.registry import COMMANDS, REGISTRIES, registry_for

BUILTINS = {"train", "eval", "predict", "list", "bench", "sweep-report", "reproduce"}


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("prism: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_builtin_commands_are_registry_entries():
    assert BUILTINS <= set(COMMANDS.names())
    assert registry_for("commands") is COMMANDS and REGISTRIES["command"] is COMMANDS
    for name in BUILTINS:
        entry = COMMANDS.get(name)
        assert entry.module == "prism.framework.cli"
        assert entry.description and entry.metadata["usage"].startswith(f"prism {name}")
        assert f"  {name} " in usage() and entry.metadata["usage"] in usage()


@pytest.fixture
def hello():
    """A command registered at run time, as a plugin module would; removed afterwards."""
    calls = []

    @COMMANDS.register("test-hello", usage="prism test-hello [NAME]")
    def hello(args: list[str]) -> int:
        """Say hello (a test command)."""
        if args == ["bad"]:
            raise ConfigError("test-hello: 'bad' is not a name")
        calls.append(args)
        print("hello", *args)
        return 3 if args == ["three"] else 0

    yield calls
    COMMANDS.unregister("test-hello")


def test_registered_command_runs_through_main(hello, capsys):
    assert main(["test-hello", "world"]) == 0
    assert hello == [["world"]]
    assert capsys.readouterr().out == "hello world\n"
    assert main(["test-hello", "three"]) == 3  # the handler's status is the exit status

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  test-hello +Say hello \(a test command\)\.$", out, re.MULTILINE), out
    assert "prism test-hello [NAME]" in out


def test_command_errors_are_one_line_and_unknown_names_get_suggestions(hello, capsys):
    assert main(["test-hello", "bad"]) == 2
    assert _error_line(capsys.readouterr().err) == "prism: error: test-hello: 'bad' is not a name"

    assert main(["test-helo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'test-helo'. Did you mean: test-hello?" in err
    assert "  test-hello " in err  # the usage lists it


def test_list_shows_commands(hello, capsys):
    assert main(["list", "command"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^commands \({len(COMMANDS.names())}\):$", out, re.MULTILINE)
    assert re.search(r"^  test-hello +Say hello \(a test command\)\.$", out, re.MULTILINE), out
    assert re.search(r"^  sweep-report +Tabulate", out, re.MULTILINE)


FAKE_COMMANDS = '''\
"""Commands of a fake distribution: one registered on import, one handed over as a callable."""

from prism.framework.registry import COMMANDS


@COMMANDS.register("fake-module-cmd", usage="prism fake-module-cmd")
def module_cmd(args):
    """Registered by its module on import."""
    print("module command ran", args)
    return 0


def callable_cmd(args):
    """Registered from its entry point."""
    print("callable command ran", args)
    return 5


def train(args):
    """Tries to take a built-in's name."""
    return 0
'''


@pytest.fixture(scope="module")
def fake_env(tmp_path_factory) -> dict:
    site = tmp_path_factory.mktemp("site")
    (site / "prism_fake_commands.py").write_text(FAKE_COMMANDS)
    dist_info = site / "prism_fake_commands-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: prism-fake-commands\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        fake-module-cmd = prism_fake_commands
        fake-callable-cmd = prism_fake_commands:callable_cmd
        fake-broken-cmd = prism_module_that_is_not_installed:run
        train = prism_fake_commands:train
        """))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def test_entry_point_commands_are_listed_and_failures_reported(fake_env, tmp_path):
    proc = run_prism("--help", cwd=tmp_path, env=fake_env)

    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  fake-module-cmd +Registered by its module on import\.$", proc.stdout, re.MULTILINE)
    assert re.search(r"^  fake-callable-cmd +Registered from its entry point\.$", proc.stdout, re.MULTILINE)
    assert re.search(r"^  train +Train a model", proc.stdout, re.MULTILINE)  # the built-in keeps its name
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: prism command ")]
    assert len(warnings) == 2, proc.stderr
    broken, taken = sorted(warnings)
    assert "fake-broken-cmd = prism_module_that_is_not_installed:run" in broken
    assert "ModuleNotFoundError: No module named 'prism_module_that_is_not_installed'" in broken
    assert "train = prism_fake_commands:train" in taken and "already registered by prism.framework.cli" in taken
    assert "Traceback" not in proc.stderr


def test_entry_point_command_runs(fake_env, tmp_path):
    proc = run_prism("fake-callable-cmd", "a", "b", cwd=tmp_path, env=fake_env)

    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "callable command ran ['a', 'b']\n"


def test_unknown_command_names_the_failed_entry_point(fake_env, tmp_path):
    proc = run_prism("fake-broken-cmd", cwd=tmp_path, env=fake_env)

    assert proc.returncode == 2
    assert "unknown command 'fake-broken-cmd'" in _error_line(proc.stderr)
    assert "prism command fake-broken-cmd = prism_module_that_is_not_installed:run failed to load" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def example_env(tmp_path_factory) -> dict:
    """pip-install the example package (tests/plugin_package) into a target dir, as test_third_party_plugin does."""
    target = install_example_package(tmp_path_factory.mktemp("example_plugin"))
    entry_points = (next(target.glob("prism_example_plugin-*.dist-info")) / "entry_points.txt").read_text()
    assert "[prism.commands]\ntiny-mlp-size = prism_example_plugin.commands:tiny_mlp_size" in entry_points
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def test_installed_package_adds_a_command(example_env, tmp_path: Path):
    help_proc = run_prism("--help", cwd=tmp_path, env=example_env)
    assert help_proc.returncode == 0, help_proc.stderr
    assert re.search(r"^  tiny-mlp-size +Print the parameter count of tiny_mlp", help_proc.stdout, re.MULTILINE)
    assert "warning" not in help_proc.stderr

    proc = run_prism("tiny-mlp-size", "16", cwd=tmp_path, env=example_env)
    assert proc.returncode == 0, proc.stderr
    # flatten(8x8x1) -> Linear(64, 16) -> ReLU -> Linear(16, 10), built through MODELS from the package's model
    assert proc.stdout.strip() == f"tiny_mlp hidden=16: {64 * 16 + 16 + 16 * 10 + 10} parameters"

    bad = run_prism("tiny-mlp-size", "wide", cwd=tmp_path, env=example_env)
    assert bad.returncode == 2
    assert _error_line(bad.stderr) == "prism: error: usage: prism tiny-mlp-size [HIDDEN], got 'wide'"
