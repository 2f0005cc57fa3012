"""Several evaluators in one training run (``evals``): each task on its split at its own cadence, logged under
its name; the values equal those of ``prism eval`` on the same checkpoint; bad entries are one-line errors."""

from __future__ import annotations

import json

import pytest

from prism.framework.config import compose
from prism.framework.errors import ConfigError, UnknownNameError
from prism.framework.evaluate import evaluate_run
from prism.framework.evaluators import MAIN, build_evaluators, metric_owner
from prism.framework.run import Run
from tests.conftest import REPO, run_prism

EVALS = ("evals={main:{},knn:{task:knn,every:40,task_overrides:{k:10}},fit:{split:train,every_epochs:0.5},"
         "other:{dataset:{name:digits,split_seed:1},every:40}}")  # other: a second dataset (another digits split)


@pytest.fixture(scope="module")
def two_evaluator_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("evals") / "run"
    out = run_prism("train", "train.steps=40", "train.eval_every=20", "loader.placement=device",
                    "train.steps_per_call=16", EVALS, f"hydra.run.dir={run_dir}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, records, json.loads((run_dir / "result.json").read_text())


def _steps_with(records: list[dict], metric: str) -> list[int]:
    return [r["step"] for r in records if metric in r]


def test_each_evaluator_runs_at_its_own_cadence_under_its_name(two_evaluator_run):
    _, records, result = two_evaluator_run
    assert _steps_with(records, "eval/accuracy") == [20, 40]  # main: train.eval_every
    assert _steps_with(records, "knn/knn/top1") == [40]  # every 40
    # half an epoch of the 1437 training digits at batch 64: every 11 steps, and at the end; the device path's
    # 16-step calls end at every evaluation, so each lands on its step
    assert _steps_with(records, "fit/accuracy") == [11, 22, 33, 40]
    assert _steps_with(records, "other/accuracy") == [40]
    assert result["status"] == "completed"
    assert {"eval/accuracy", "knn/knn/top1", "fit/accuracy"} <= set(result["metrics"])


def test_an_evaluators_numbers_equal_prism_eval_on_the_same_state(two_evaluator_run, tmp_path):
    run_dir, records, result = two_evaluator_run
    knn = evaluate_run(run_dir, ["task=knn", "task.k=10"], step="latest", out_dir=tmp_path / "knn")
    assert knn["step"] == 40
    assert knn["metrics"]["eval/knn/top1"] == pytest.approx(result["metrics"]["knn/knn/top1"], abs=1e-6)
    on_train = evaluate_run(run_dir, ["dataset.eval_split=train"], step="latest", out_dir=tmp_path / "train")
    assert on_train["metrics"]["eval/accuracy"] == pytest.approx(result["metrics"]["fit/accuracy"], abs=1e-6)
    assert on_train["metrics"]["eval/accuracy"] != pytest.approx(result["metrics"]["eval/accuracy"], abs=1e-6)
    # the second dataset is read on the host with the run's normalization, as prism eval normalizes with the
    # statistics the checkpoint records (digits computes its own on its training split, which split_seed changes)
    other = evaluate_run(run_dir, ["dataset.split_seed=1", "loader.placement=host"], step="latest",
                         out_dir=tmp_path / "other")
    assert other["metrics"]["eval/accuracy"] == pytest.approx(result["metrics"]["other/accuracy"], abs=1e-6)
    assert other["metrics"]["eval/loss"] == pytest.approx(result["metrics"]["other/loss"], abs=1e-6)
    assert other["metrics"]["eval/accuracy"] != pytest.approx(result["metrics"]["eval/accuracy"], abs=1e-6)


@pytest.fixture(scope="module")
def run():
    return Run(compose(["train.steps=2", "train.eval_every=5"]), initialize=False)


def _evaluators(run: Run, evals):
    run.cfg.evals = evals
    try:
        return build_evaluators(run)
    finally:
        run.cfg.evals = None


def test_without_evals_the_run_has_its_one_evaluator(run):
    (main,) = build_evaluators(run)
    assert (main.name, main.task, main.split, main.every, main.prefix) == (MAIN, run.task, "test", 5, "eval")
    assert metric_owner([main], "eval/accuracy") is main and metric_owner([main], "knn/top1") is None


def test_the_objectives_outputs_are_reported_by_one_evaluator(run):
    main, knn = _evaluators(run, {"main": {}, "knn": {"task": "knn"}})
    assert main.reports_objective([main, knn]) and not knn.reports_objective([main, knn])
    first, second = _evaluators(run, {"a": {}, "b": {}})
    assert first.reports_objective([first, second]) and not second.reports_objective([first, second])


def test_an_evaluator_of_the_runs_task_shares_it_and_another_gets_its_own(run):
    same, other = _evaluators(run, {"a": {"every": 3}, "b": {"task_overrides": {"top_k": 2}}})
    assert same.task is run.task and same.every == 3 and same.prefix == "a"
    assert other.task is not run.task and other.task_name == "classification" and other.every == 5


@pytest.mark.parametrize(("evals", "message"), [
    ({"a": {"tsk": "knn"}}, "unknown key evals.a.tsk"),
    ({"a": {"task": "knn", "task_overrides": {"kk": 3}}}, "unknown key evals.a.task_overrides.kk"),
    ({"a": {"task": "knn", "task_overrides": {"k": 0}}}, "evals.a.task_overrides.k must be >= 1, got 0"),
    ({"a": {"every": -2}}, "evals.a.every"),
    ({"a": {"every": 2, "every_epochs": 1}}, "not both"),
    ({"a": {"every_epochs": 0}}, "evals.a.every_epochs"),
    ({"a": {"split": "validation"}}, "validation"),
    ({"a": 3}, "evals.a must be a mapping"),
    ({"a": {"dataset": {"split_seed": 1}}}, "evals.a.dataset must be a mapping with a dataset name"),
    ({"a": {"dataset": {"name": "digits", "split_sed": 1}}}, "unknown key evals.a.dataset.split_sed"),
    ({"a": {"dataset": {"name": "synthetic"}}}, "the run's model was built for 10 classes of 8x8x1"),
    ({}, "non-empty"),
])
def test_a_bad_evaluator_entry_is_a_one_line_error_naming_it(run, evals, message):
    with pytest.raises(ConfigError, match=message) as info:
        _evaluators(run, evals)
    assert "\n" not in str(info.value)


def test_an_unknown_evaluator_task_suggests_the_close_names(run):
    with pytest.raises(UnknownNameError, match="knn"):
        _evaluators(run, {"a": {"task": "knnn"}})


def test_a_best_metric_no_evaluator_reports_is_refused_before_training(tmp_path):
    from prism.framework.train import Trainer

    cfg = compose(["train.steps=2", "evals={knn:{task:knn}}"])
    with pytest.raises(ConfigError, match="checkpoint.best_metric='eval/accuracy' names no evaluator"):
        Trainer(cfg, tmp_path / "run", initialize=False)
