"""result.json's speed record: phases that add up, time to accuracy, and stop_at ending the run there."""

import json

import numpy as np

from prism.framework.logging import read_metrics


def test_time_to_and_stop_at_follow_the_logged_evaluations(train_run, tmp_path):
    """Targets 0.0 and 2.0 (accuracy never reaches 2): the first is reached at the first evaluation, the second
    never; stop_at=0.0 ends the run at that first evaluation, not at train.steps."""
    _, result = train_run(["train.time_to=[0.0,2.0]", "train.stop_at=1e-9", "checkpoint.enabled=false",
                           "logging.tensorboard=false", "logging.plots=false"], tmp_path / "run")
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/accuracy" in r]
    assert result["stopped_at"] == evals[0]["step"] == 10 and result["steps"] == 10
    hit = result["time_to"]["0.0"]
    assert hit["step"] == 10 and hit["value"] == evals[0]["eval/accuracy"]
    assert 0 < hit["from_first_step_s"] < hit["from_start_s"] <= result["process_s"]
    assert result["time_to"]["2.0"] is None
    json.loads((tmp_path / "run" / "result.json").read_text())  # valid JSON


def test_timing_phases_add_up_to_the_process_wall(train_run, tmp_path):
    """The phases measured inside the run plus startup (process start -> run construction) cover the process
    wall up to the record within 5 % (what is left: writing the record, a few Python statements)."""
    _, result = train_run(["logging.tensorboard=false", "logging.plots=false"], tmp_path / "run")
    timing = result["timing"]
    assert {"startup_s", "prepare_s", "init_s", "compile_s", "train_s", "eval_s", "checkpoint_s"} <= set(timing)
    inside = sum(timing.values()) - timing["startup_s"]  # in-process, startup also holds earlier tests
    run_wall = result["process_s"] - timing["startup_s"]
    assert abs(inside - run_wall) <= 0.05 * run_wall + 0.2, (timing, result["process_s"])
    assert np.isfinite(result["loop_images_per_s"]) and result["loop_images_per_s"] > 0
