"""Declared contracts, checked when the run is built: what a task or objective needs from the model
(``model_contract``), what a task needs from the examples (``batch_keys``), and the training step passed to an
objective that asks for it (``takes_step``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hydra.core.config_store import ConfigStore

from prism.framework.api import Detector, FeatureModel, Objective, contract_members, missing_members
from prism.framework.config import compose
from prism.framework.errors import ConfigError
from prism.framework.evaluate import evaluate_run
from prism.framework.logging import read_metrics
from prism.framework.registry import OBJECTIVES
from prism.framework.run import Run

FAST = ["train.steps=4", "train.batch_size=32", "train.log_every=1", "logging.tensorboard=false",
        "logging.plots=false", "checkpoint.enabled=false"]


def test_a_protocols_members_are_read_from_its_declaration():
    assert contract_members(FeatureModel) == ["num_features", "features"]
    assert contract_members(Detector) == ["detect"]

    class Half:
        num_features = "wide"  # not an int

        def features(self, x):
            return x

    assert missing_members(Half(), FeatureModel) == ["num_features"]
    assert missing_members(object(), Detector) == ["detect()"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["task=detection"], "task 'detection' needs a model with detect() (Detector); model 'simple_cnn'"),
    (["task=segmentation"], "task 'segmentation' needs examples with mask; dataset 'digits' (split 'test') gives "
                            "image, label"),
])
def test_a_task_the_model_or_data_cannot_serve_is_refused_at_build(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        Run(compose(["train.steps=2", *overrides]), initialize=False)
    assert "\n" not in str(info.value)


def test_prism_eval_with_a_task_the_run_cannot_serve_is_one_line(tmp_path):
    from prism.framework.train import Trainer

    Trainer(compose([*FAST, "train.steps=1", "checkpoint.enabled=true"]), tmp_path / "run").fit()
    with pytest.raises(ConfigError, match="task 'segmentation' needs examples with mask"):
        evaluate_run(tmp_path / "run", ["task=segmentation"], step="latest", out_dir=tmp_path / "eval")


@dataclass
class StepSeenConfig:
    pass


class StepSeen(Objective):
    """Cross-entropy that reports the step the core passes it."""

    takes_step = True

    def __call__(self, model, batch, key, *, step):
        logits = model(batch["image"]).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"step_seen": step.astype(jnp.float32)}


class NeedsFeatures(StepSeen):
    model_contract = FeatureModel


@contextlib.contextmanager
def _registered(name: str, objective: type[Objective]):
    OBJECTIVES.register(name, config=StepSeenConfig)(lambda cfg, *, model, data, rngs: objective())
    try:
        yield
    finally:
        OBJECTIVES.unregister(name)
        ConfigStore.instance().repo.get("objective", {}).pop(f"{name}.yaml", None)  # stored by compose()


def test_an_objective_that_takes_the_step_gets_the_runs_step(tmp_path):
    from prism.framework.train import Trainer

    with _registered("test_step_seen", StepSeen):
        Trainer(compose([*FAST, "objective=test_step_seen", "train.grad_accum_steps=2"]), tmp_path).fit()
    seen = [(r["step"], r["train/step_seen"]) for r in read_metrics(tmp_path) if "train/step_seen" in r]
    # the micro-step about to be taken (0-based), whatever the accumulation
    np.testing.assert_array_equal(seen, [(s, s - 1) for s in range(1, 9)])


def test_an_objectives_model_contract_is_checked_at_build():
    with _registered("test_needs_features", NeedsFeatures):
        run = Run(compose(["train.steps=2", "objective=test_needs_features"]), initialize=False)
        assert run.abstract_system.model.num_features > 0  # simple_cnn serves it
        with pytest.raises(ConfigError, match=r"objective 'test_needs_features' needs a model with num_features, "
                                              r"features\(\) \(FeatureModel\); model 'unet'"):
            Run(compose(["train.steps=2", "objective=test_needs_features", "model=unet", "task=segmentation"]),
                initialize=False)


@pytest.mark.parametrize(("model", "message"), [
    # strides and pools reduce 8x8 digits to nothing: before, the run stopped at step 1 blaming the learning rate
    ("alexnet", r"model 'alexnet' reduces this dataset's 8x8x1 images to an empty value \(shape \(2, 0, 0, 64\)"),
    # a U-Net of 4 levels cannot concatenate its skips at 8x8: before, a TypeError from inside jit
    ("unet", r"model 'unet' cannot run on this dataset's 8x8x1 images: TypeError: Cannot concatenate"),
])
def test_a_model_that_cannot_take_the_images_is_refused_at_build(model, message):
    with pytest.raises(ConfigError, match=message) as info:
        Run(compose(["train.steps=2", f"model={model}"]), initialize=False)
    assert "\n" not in str(info.value)
