"""A NaN loss stops the run with :class:`NonFiniteLossError` naming the step; the non-finite update is
not applied and the last good checkpoint stays; the CLI exits 2 with a message saying NaN."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import FAST, REPO, read_result, run_prism
from flax import nnx
from hydra.core.config_store import ConfigStore

from prism.framework.api import Objective
from prism.framework.config import compose
from prism.framework.errors import NonFiniteLossError
from prism.framework.logging import read_metrics
from prism.framework.registry import OBJECTIVES
from prism.framework.train import Trainer

NAN_AT = 13  # the loss of the 13th batch (logged as step 13) is NaN


class Calls(nnx.Variable):
    """How many training steps the objective has seen (carried in the train state's ``rest``)."""


@dataclass
class NaNAtConfig:
    nan_at: int = NAN_AT
    grads_only: bool = False  # the loss stays finite; only its gradient is NaN


class NaNAt(Objective):
    """Cross-entropy, multiplied by NaN from the ``nan_at``-th call on (so the gradients are NaN too)."""

    def __init__(self, cfg: NaNAtConfig, num_classes: int) -> None:
        self.nan_at, self.num_classes, self.grads_only = cfg.nan_at, num_classes, cfg.grads_only
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, model, batch, key):
        logits = model(batch["image"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        self.calls[...] = self.calls[...] + 1
        bad = self.calls[...] >= self.nan_at
        if self.grads_only:  # value 0; d/dx of 0 * sqrt(0) is 0 * inf = NaN once bad
            return loss + 0.0 * jnp.sqrt(jnp.abs(logits[0, 0]) * (1.0 - bad)), {}
        return loss * jnp.where(bad, jnp.nan, 1.0), {}


def build_nan_at(cfg: NaNAtConfig, *, model, data, rngs) -> NaNAt:
    return NaNAt(cfg, data.num_classes)


#: log every 10 steps, checkpoint every 5: the NaN at step 13 is noticed at step 15 (before its save)
NAN_RUN = [*FAST, "objective=test_nan_at", "checkpoint.every=5", "train.log_every=10", "logging.tensorboard=false",
           "logging.plots=false"]


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """``(trainer, error, run_dir)`` of a run whose loss turns NaN at step ``NAN_AT``."""
    OBJECTIVES.register("test_nan_at", config=NaNAtConfig)(build_nan_at)
    try:
        run_dir = tmp_path_factory.mktemp("nan_run")
        trainer = Trainer(compose(NAN_RUN), run_dir)
        with pytest.raises(NonFiniteLossError) as info:
            trainer.fit()
        return trainer, info.value, run_dir
    finally:
        OBJECTIVES.unregister("test_nan_at")
        ConfigStore.instance().repo.get("objective", {}).pop("test_nan_at.yaml", None)  # stored by compose()


def test_nan_gradients_under_a_finite_loss_stop_the_run(tmp_path):
    """The guard covers the gradients, not only the loss: no NaN update is applied or checkpointed."""
    OBJECTIVES.register("test_nan_at", config=NaNAtConfig)(build_nan_at)
    try:
        trainer = Trainer(compose([*NAN_RUN, "objective.grads_only=true", "train.log_every=1"]), tmp_path)
        with pytest.raises(NonFiniteLossError, match=f"at step {NAN_AT};"):
            trainer.fit()
    finally:
        OBJECTIVES.unregister("test_nan_at")
        ConfigStore.instance().repo.get("objective", {}).pop("test_nan_at.yaml", None)
    logged = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert all(np.isfinite(r["train/loss"]) for r in logged)  # the loss never showed it
    assert [r["step"] for r in logged] == list(range(1, NAN_AT))  # stopped before logging the NaN step
    state = jax.device_get(trainer.state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert _checkpoint_steps(tmp_path) == [5, 10]


def _checkpoint_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_nan_loss_raises_and_points_at_the_last_good_checkpoint(nan_run):
    trainer, error, run_dir = nan_run
    message = str(error)
    assert "NaN" in message
    assert f"the last good checkpoint is step 10 in {run_dir / 'checkpoints'}" in message
    assert "test_nan_at" not in OBJECTIVES  # unregistered again
    # the loop stopped at the first check after the NaN: the log at step 10 was the last one
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [10]
    assert all(np.isfinite(r["train/loss"]) for r in read_metrics(run_dir) if "train/loss" in r)


def test_nan_error_names_the_step_as_logged(nan_run):
    _, error, _ = nan_run
    assert f"at step {NAN_AT};" in str(error)


def test_non_finite_updates_are_not_applied(nan_run):
    trainer, _, _ = nan_run
    state = jax.device_get(trainer.state)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.opt_state)
               if jnp.issubdtype(np.asarray(x).dtype, jnp.floating))
    # the objective's own state was not advanced by the NaN steps either: it saw 12 good steps
    calls = next(x for p, x in jax.tree_util.tree_flatten_with_path(state.rest)[0]
                 if "calls" in jax.tree_util.keystr(p))
    assert int(calls) == NAN_AT - 1
    assert int(state.bad_step) >= 0


def test_last_good_checkpoint_stays_and_is_finite(nan_run):
    trainer, _, run_dir = nan_run
    steps = _checkpoint_steps(run_dir)
    assert steps == [5, 10]  # nothing saved at or after the NaN
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    try:
        restored = manager.restore(10, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    finally:
        manager.close()
    state = dict(restored["state"])
    params = [np.asarray(v) for v in jax.tree.leaves(state["params"])]
    assert len(params) == len(jax.tree.leaves(trainer.state.params))
    assert all(np.isfinite(v).all() for v in params)
    assert int(np.asarray(state["step"])) == 10
    assert int(np.asarray(state["bad_step"])) == -1


def test_cli_nan_exits_2_with_a_nan_message(tmp_path):
    run_dir = tmp_path / "diverged"
    proc = run_prism("train", *FAST, "optimizer.lr=1e30", "schedule=constant", "train.log_every=1",
                     "logging.tensorboard=false", "logging.plots=false", f"hydra.run.dir={run_dir}", cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "prism: error:" in proc.stderr and "NaN" in proc.stderr
    assert "Traceback" not in proc.stderr
    result = read_result(run_dir)
    assert result["status"] == "failed" and result["error"].startswith("NonFiniteLossError")
    assert not (run_dir / "checkpoints").exists() or not _checkpoint_steps(run_dir)


@dataclass
class NaNOnConfig:
    steps: tuple[int, ...] = (4, 7)  # 0-based training steps whose loss is NaN (logged as steps 5 and 8)


class NaNOn(Objective):
    """Cross-entropy, NaN at the configured steps only: transient divergence (a bad batch), not a blow-up."""

    takes_step = True

    def __init__(self, steps) -> None:
        self.steps = tuple(steps)

    def __call__(self, model, batch, key, *, step):
        logits = model(batch["image"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        bad = jnp.any(jnp.asarray(self.steps) == step)
        return loss * jnp.where(bad, jnp.nan, 1.0), {}


def _nan_on_run(run_dir, *overrides):
    OBJECTIVES.register("test_nan_on", config=NaNOnConfig)(lambda cfg, *, model, data, rngs: NaNOn(cfg.steps))
    try:
        trainer = Trainer(compose([*FAST, "objective=test_nan_on", "train.steps=10", "train.log_every=1",
                                   "checkpoint.every=1", "checkpoint.keep=20", "checkpoint.best_metric=''",
                                   "logging.tensorboard=false", "logging.plots=false", *overrides]), run_dir)
        return trainer, trainer.fit
    finally:
        OBJECTIVES.unregister("test_nan_on")
        ConfigStore.instance().repo.get("objective", {}).pop("test_nan_on.yaml", None)


def _params_at(trainer, run_dir, step):
    from prism.framework.checkpoint import Checkpointer
    from prism.framework.config import CheckpointConfig

    checkpointer = Checkpointer(run_dir / "checkpoints", CheckpointConfig(best_metric=""), read_only=True)
    try:
        state, _, _ = checkpointer.restore(step, trainer.abstract_state)
    finally:
        checkpointer.close()
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def test_below_max_bad_steps_the_run_skips_the_bad_steps_and_completes(tmp_path):
    trainer, fit = _nan_on_run(tmp_path, "train.max_bad_steps=3")
    result = fit()
    assert result["status"] == "completed" and result["steps"] == 10 and result["skipped_steps"] == 2
    # the skipped steps changed nothing: the weights after step 5 (NaN) are those after step 4; step 6 trains
    before, skipped, after = (_params_at(trainer, tmp_path, s) for s in (4, 5, 6))
    for a, b in zip(before, skipped, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(skipped, after, strict=True))
    logged = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert [i + 1 for i, v in enumerate(logged) if not np.isfinite(float(v))] == [5, 8]  # logged ("nan")


def test_at_max_bad_steps_the_run_stops_naming_the_first(tmp_path):
    _, fit = _nan_on_run(tmp_path, "train.max_bad_steps=2")
    with pytest.raises(NonFiniteLossError, match=r"at step 5; its update and those of 1 later step\(s\) "
                                                 r"\(train.max_bad_steps=2\) were not applied, the last good "
                                                 r"checkpoint is step 7"):
        fit()
