"""``prism eval``: rebuild a saved run from its checkpoint, evaluate it offline, never touch its checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prism.framework.errors import CheckpointError, ConfigError, UnknownNameError
from prism.framework.evaluate import evaluate_run, evaluate_tasks, load_run, parse_task_list, run_config
from prism.framework.evaluators import Evaluation
from tests.conftest import REPO, run_prism


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished tiny digits run with checkpoints at steps 10 and 20 (the best one kept too)."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    run_dir = tmp_path_factory.mktemp("saved") / "run"
    cfg = compose(["train.steps=20", "train.batch_size=32", "train.eval_every=10", "logging.progress=false",
                   "model.widths=[8,16]", "checkpoint.keep=2", "checkpoint.async_save=false"])
    result = Trainer(cfg, run_dir).fit()
    return run_dir, result


def _checkpoint_files(run_dir):
    return sorted((p.relative_to(run_dir), p.stat().st_mtime_ns) for p in (run_dir / "checkpoints").rglob("*"))


def test_offline_eval_of_the_last_step_equals_the_runs_final_metrics(saved_run, tmp_path):
    run_dir, result = saved_run
    before = _checkpoint_files(run_dir)
    offline = evaluate_run(run_dir, step="latest", out_dir=tmp_path / "eval")
    assert offline["step"] == 20 and offline["mode"] == "offline" and offline["task"] == "classification"
    for name, value in result["metrics"].items():
        assert offline["metrics"][name] == pytest.approx(value, rel=1e-5), name
    written = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert written["metrics"] == offline["metrics"] and written["checkpoint"] == str(run_dir.absolute())
    assert _checkpoint_files(run_dir) == before  # read-only: nothing saved, deleted or rewritten


def test_init_step_is_the_untrained_architecture(saved_run, tmp_path):
    run_dir, result = saved_run
    trained = evaluate_run(run_dir, step="latest", out_dir=tmp_path / "trained")["metrics"]
    untrained = evaluate_run(run_dir, step="init", out_dir=tmp_path / "init")
    assert untrained["step"] == "init"
    assert untrained["metrics"]["eval/loss"] > trained["eval/loss"] + 0.05  # 20 steps do lower the loss


def test_a_restored_run_skips_the_initial_weights_it_would_overwrite(saved_run, tmp_path):
    import jax

    run_dir, _ = saved_run
    from prism.framework.run import Run

    run, step = load_run(run_dir, step="latest")
    assert step == 20 and int(run.state.step) == 20
    assert not hasattr(run, "programs") and not hasattr(run, "run_dir")  # no training programs, no run directory
    fresh, none = load_run(run_dir, step="init")
    assert none is None and int(fresh.state.step) == 0
    bare = Run(run.cfg, initialize=False)
    assert bare.state is None
    assert jax.tree.structure(bare.abstract_state) == jax.tree.structure(run.state)
    assert not (tmp_path / "bare").exists()


def test_init_step_needs_only_the_runs_hydra_config(saved_run, tmp_path):
    """A run copied without its checkpoints (e.g. a recorded experiment) still gives its random-init baseline."""
    from omegaconf import OmegaConf

    from prism.framework.config import compose

    run_dir, _ = saved_run
    from_checkpoint = evaluate_run(run_dir, step="init", out_dir=tmp_path / "from_checkpoint")
    bare = tmp_path / "bare"
    (bare / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(["train.steps=20", "train.batch_size=32", "train.eval_every=10", "model.widths=[8,16]"]),
                   bare / ".hydra" / "config.yaml")
    from_hydra_config = evaluate_run(bare, step="init", out_dir=tmp_path / "from_hydra_config")
    assert from_hydra_config["step"] == "init" and from_hydra_config["metrics"] == from_checkpoint["metrics"]
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        evaluate_run(bare, step="latest", out_dir=tmp_path / "latest")
    (bare / ".hydra" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match=r"eval.step=init needs the run's config: .* has neither checkpoints nor "
                                              r"\.hydra/config.yaml"):
        evaluate_run(bare, step="init", out_dir=tmp_path / "nothing")


def test_overrides_change_the_evaluation_not_the_model(saved_run, tmp_path):
    run_dir, _ = saved_run
    one_batch = evaluate_run(run_dir, ["train.max_eval_batches=1", "train.eval_batch_size=40"], step="latest",
                             out_dir=tmp_path / "one")
    full = evaluate_run(run_dir, step="latest", out_dir=tmp_path / "full")
    # 40 of 360 test examples: a different (sub)set, so (almost surely) a different loss, same architecture
    assert not np.isclose(one_batch["metrics"]["eval/loss"], full["metrics"]["eval/loss"])
    assert one_batch["overrides"] == ["train.max_eval_batches=1", "train.eval_batch_size=40"]


def test_run_config_restores_the_saved_values_typed(saved_run):
    run_dir, _ = saved_run
    from prism.framework.evaluate import _checkpointer

    ckpt = _checkpointer(run_dir)
    config = ckpt.read_meta(max(ckpt.all_steps()))["config"]
    ckpt.close()
    cfg = run_config(config, ["task.top_k=3"])
    assert list(cfg.model.widths) == [8, 16] and cfg.train.steps == 20 and cfg.task.top_k == 3
    assert cfg.checkpoint.enabled is False
    with pytest.raises(ConfigError, match="train.no_such_key"):
        run_config(config, ["train.no_such_key=1"])
    with pytest.raises(ConfigError, match=r"train.batch_size=abc.*could not be converted to Integer"):
        run_config(config, ["train.batch_size=abc"])
    with pytest.raises(ConfigError, match=r"\+"):
        run_config(config, ["+train.extra=1"])


def test_a_directory_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        evaluate_run(tmp_path)
    with pytest.raises(CheckpointError, match="no such run directory"):
        evaluate_run(tmp_path / "missing")


def test_several_tasks_in_one_call_equal_separate_calls(saved_run, tmp_path, monkeypatch):
    """One process, one checkpoint restore; kNN and the probe share the backbone's features (one pass over
    each split for both); each result equals the single-task call its ``overrides`` describe."""
    run_dir, trained = saved_run
    before = _checkpoint_files(run_dir)
    passes = []
    real_outputs = Evaluation.outputs
    monkeypatch.setattr(Evaluation, "outputs", lambda self, state, split, *a, **k:
                        passes.append(len(self.run.split(split))) or real_outputs(self, state, split, *a, **k))
    results = evaluate_tasks(run_dir, ["linear_probe", "knn", "classification"],
                             ["task.epochs=5", "task.k=20", "train.eval_batch_size=64"], step="latest",
                             out_dir=tmp_path / "multi")
    monkeypatch.undo()
    # the shared features: one pass over the evaluation (360) and training (1437) splits; classification its own
    assert sorted(passes) == [360, 360, 1437]
    assert [r["task"] for r in results] == ["linear_probe", "knn", "classification"]
    assert results[0]["overrides"] == ["train.eval_batch_size=64", "task=linear_probe", "task.epochs=5"]
    assert results[1]["overrides"] == ["train.eval_batch_size=64", "task=knn", "task.k=20"]
    assert results[1]["task_settings"]["k"] == 20 and results[0]["task_settings"]["probe_epochs"] == 5
    for name, value in trained["metrics"].items():  # the run's own task, as the run reported it
        assert results[2]["metrics"][name] == pytest.approx(value, rel=1e-5), name
    for result in results[:2]:
        written = json.loads((tmp_path / "multi" / result["task"] / "result.json").read_text())
        assert written["metrics"] == result["metrics"] and written["step"] == 20
        assert written["evaluated_with"] == ["linear_probe", "knn", "classification"]
        alone = evaluate_run(run_dir, result["overrides"], step="latest", out_dir=tmp_path / result["task"])
        assert alone["metrics"].keys() == result["metrics"].keys()
        for name, value in alone["metrics"].items():
            assert result["metrics"][name] == pytest.approx(value, rel=1e-6), name
    assert _checkpoint_files(run_dir) == before


def test_task_lists_and_their_errors(saved_run):
    run_dir, _ = saved_run
    assert parse_task_list("[linear_probe,knn]") == ["linear_probe", "knn"] and parse_task_list("knn") == ["knn"]
    with pytest.raises(ConfigError, match=r"eval.tasks=\[linear_probe,knn\]"):
        parse_task_list("linear_probe,knn")  # Hydra's sweep syntax
    with pytest.raises(UnknownNameError, match=r"unknown task 'knnn'\. Did you mean: knn\?"):
        evaluate_tasks(run_dir, ["linear_probe", "knnn"])
    with pytest.raises(ConfigError, match="more than once"):
        evaluate_tasks(run_dir, ["knn", "knn"])
    with pytest.raises(ConfigError, match="eval.tasks only"):
        evaluate_tasks(run_dir, ["knn"], ["task=linear_probe"])
    with pytest.raises(ConfigError, match=r"'task.no_such_key=1': none of the tasks knn, linear_probe has"):
        evaluate_tasks(run_dir, ["knn", "linear_probe"], ["task.k=3", "task.no_such_key=1"])


@pytest.mark.slow
def test_cli_eval(saved_run, tmp_path):
    run_dir, result = saved_run
    out = run_prism("eval", f"checkpoint={run_dir}", "eval.step=20", "eval.tasks=[classification,knn]",
                    f"eval.out={tmp_path / 'cli'}", cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert [line["task"] for line in lines] == ["classification", "knn"] and lines[0]["step"] == 20
    assert lines[0]["metrics"]["eval/accuracy"] == pytest.approx(result["metrics"]["eval/accuracy"], rel=1e-5)
    assert lines[1]["out_dir"] == str(tmp_path / "cli" / "knn") and "eval/knn/top1" in lines[1]["metrics"]
    assert "read only" not in out.stderr  # orbax's notice about the read-only manager is filtered
    typo = run_prism("eval", f"checkpoint={run_dir}", "eval.tasks=[linear_probe,knnn]", cwd=REPO)
    assert typo.returncode == 2 and "unknown task 'knnn'. Did you mean: knn?" in typo.stderr
    missing = run_prism("eval", f"checkpoint={run_dir}", "eval.step=7", cwd=REPO)
    assert missing.returncode == 2 and "no checkpoint at step 7" in missing.stderr and "[10, 20]" in missing.stderr
    no_arg = run_prism("eval", "task=classification", cwd=REPO)
    assert no_arg.returncode == 2 and "checkpoint=RUN_DIR" in no_arg.stderr
