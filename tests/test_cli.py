"""The ``prism`` command as a user runs it (real subprocesses): exit codes and the messages users read."""

from __future__ import annotations

import re

import pytest
from conftest import FAST, read_result, run_prism
from omegaconf import OmegaConf

#: Outputs these config-focused runs do not look at (checkpoints, TensorBoard, plots); saves seconds per run.
NO_OUTPUTS = ["checkpoint.enabled=false", "logging.tensorboard=false", "logging.plots=false"]


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("prism: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _listed(stdout: str) -> dict[str, dict[str, str]]:
    """``prism list`` output as {section heading: {name: description}}."""
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in stdout.splitlines():
        if m := re.fullmatch(r"(\w+) \((\d+)\):", line):
            current = sections.setdefault(m[1], {})
            continue
        if m := re.fullmatch(r"  (\S+)\s+(.*)", line):
            assert current is not None, stdout
            if m[1] != "(none":
                current[m[1]] = m[2]
    return sections


def test_list_all_kinds(tmp_path):
    proc = run_prism("list", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    sections = _listed(proc.stdout)
    assert {"models", "objectives", "tasks", "datasets", "transforms", "optimizers", "schedules", "metrics"} <= set(
        sections)
    assert sections["models"]["simple_cnn"] == "Small conv-BN-ReLU classifier (default)."
    assert sections["optimizers"]["adamw"].startswith("Adam with decoupled weight decay")
    assert {"sgd", "adamw", "lars", "lamb"} <= set(sections["optimizers"])
    assert "digits" in sections["datasets"]
    for name, entries in sections.items():  # each heading counts its entries
        count = int(re.search(rf"^{name} \((\d+)\):$", proc.stdout, re.MULTILINE)[1])
        assert count == len(entries), name
    assert "failed to import" not in proc.stderr


def test_list_one_kind(tmp_path):
    proc = run_prism("list", "optimizer", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    sections = _listed(proc.stdout)
    assert list(sections) == ["optimizers"]
    assert {"sgd", "adamw", "lars", "lamb"} <= set(sections["optimizers"])
    assert "simple_cnn" not in proc.stdout


def test_list_unknown_kind(tmp_path):
    proc = run_prism("list", "widgetz", cwd=tmp_path)

    assert proc.returncode == 2
    assert "unknown plugin kind 'widgetz'" in _error_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unknown_command_suggests_the_closest(tmp_path):
    proc = run_prism("trian", cwd=tmp_path)

    assert proc.returncode == 2
    assert "unknown command 'trian'. Did you mean: train?" in _error_line(proc.stderr)
    assert "usage: prism COMMAND" in proc.stderr


def test_unknown_model_name_suggests_the_closest(tmp_path):
    proc = run_prism("train", "model=simple_cnnn", cwd=tmp_path)

    assert proc.returncode == 2
    error = _error_line(proc.stderr)
    assert "unknown model 'simple_cnnn'" in error
    assert "Did you mean: simple_cnn" in error
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # rejected before a run directory is made


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.stepz=3", ["Key 'stepz' not in 'TrainConfig'", "full_key: train.stepz"]),
        ("train.steps=abc", ["Value 'abc' of type 'str' could not be converted to Integer", "full_key: train.steps"]),
        ("optimizer.lr=fast", ["Value 'fast' of type 'str' could not be converted to Float", "full_key: optimizer.lr"]),
    ],
)
def test_bad_override_names_the_key(tmp_path, override, expected):
    proc = run_prism("train", override, cwd=tmp_path)

    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_the_composed_config_without_training(tmp_path):
    proc = run_prism("train", "--cfg", "job", "optimizer=sgd", "train.steps=7", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^model:$", proc.stdout, re.MULTILINE)
    assert "name: simple_cnn" in proc.stdout
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.name == "simple_cnn"
    assert cfg.optimizer.name == "sgd"
    assert cfg.train.steps == 7
    assert "hydra" not in cfg  # --cfg job: the job's config only
    assert not (tmp_path / "outputs").exists()  # printed, not run


def test_train_with_chosen_optimizer_and_schedule(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_prism("train", "optimizer=sgd", "optimizer.lr=0.05", "schedule=cosine", *FAST, *NO_OUTPUTS,
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr[-4000:]
    result = read_result(run_dir)
    assert result["status"] == "completed"
    assert result["steps"] == 20
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert saved.optimizer.name == "sgd"
    assert saved.optimizer.lr == pytest.approx(0.05)
    assert saved.schedule.name == "cosine"
    assert saved.train.steps == 20
    assert list(saved.model.widths) == [8, 16]
    assert "optimizer.lr=0.05" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")


def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # test_sweeps' job settings: the width-4 job compiles what its sweeps' jobs compile (a cache hit for the later)
    tiny = ["train.steps=4", "train.batch_size=16", "train.eval_every=2", "logging.progress=false"]
    proc = run_prism("train", "-m", "model.widths=[4],[8]", *tiny, *NO_OUTPUTS, f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    widths = []
    for job in ("0", "1"):
        result = read_result(sweep / job)
        assert result["status"] == "completed"
        assert result["steps"] == 4
        widths.append(list(OmegaConf.load(sweep / job / ".hydra" / "config.yaml").model.widths))
    assert widths == [[4], [8]]
    # a wider first conv has more parameters: each job really used its own config
    assert read_result(sweep / "0")["params"] < read_result(sweep / "1")["params"]


def test_invalid_plugin_config_value_is_a_clean_error(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_prism("train", "dataset.test_fraction=1.5", *FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert proc.returncode == 2
    error = _error_line(proc.stderr)
    assert "dataset.test_fraction" in error and "1.5" in error
    assert "Traceback" not in proc.stderr
    result = read_result(run_dir)
    assert result["status"] == "failed"
    assert result["error"].startswith("ConfigError: dataset.test_fraction")


def test_invalid_model_config_value_is_a_clean_error(tmp_path):
    """A model's own validation (here ResNet's stem_conv) reaches the user as one line, not a traceback."""
    run_dir = tmp_path / "run"
    proc = run_prism("train", "model=resnet18", "model.stem_conv=winograd", "train.steps=1", "logging.progress=false",
                     f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert proc.returncode == 2
    error = _error_line(proc.stderr)
    assert "model.stem_conv must be one of" in error and "'winograd'" in error and "space_to_depth" in error
    assert "Traceback" not in proc.stderr
    assert read_result(run_dir)["error"].startswith("ConfigError: model.stem_conv")
