"""Self-supervised objectives inside the trainer, on digits (8x8 crops): the online probe reported on the
evaluation split (and equal to a computation outside the trainer), BYOL's EMA target moved by the
cosine-tau formula in the jitted step and carried in ``state.rest``, every method trains, presets compose."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST
from flax import nnx

from prism.framework import parallel
from prism.framework.config import compose
from prism.framework.data import train_iterator
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.steps import prepare_images
from prism.framework.train import Trainer
from prism.plugins.objectives._ssl_common import EMATarget

SMALL_HEADS = ["objective.proj_hidden_dim=32", "objective.proj_output_dim=16"]
QUIET = ["logging.tensorboard=false", "logging.plots=false"]


def ssl_config(objective: str, augment: str, *overrides: str):
    """A digits run of ``objective`` with the ``augment`` preset's crops resized to the 8x8 images."""
    extra = ["objective.pred_hidden_dim=32"] if objective == "byol" else []
    cfg = compose([*FAST, f"objective={objective}", f"augment={augment}", *SMALL_HEADS, *extra, *QUIET, *overrides])
    for view in cfg.augment.views:
        for op in view:
            if op.name == "random_resized_crop":
                op.size, op.scale = [8, 8], [0.5, 1.0]
    return cfg


def _local(tree):
    return jax.tree.map(jnp.asarray, jax.device_get(tree))


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    # test_ssl_eval's run uses the same schedule and rate (one train step program for both)
    run_dir = tmp_path_factory.mktemp("simclr")
    cfg = ssl_config("simclr", "simclr", "task=ssl", "checkpoint.best_metric=eval/online_probe/top1",
                     "schedule=constant", "optimizer.lr=0.01", "train.steps=40", "train.eval_every=10")
    trainer = Trainer(cfg, run_dir)
    return trainer, trainer.fit(), run_dir


def test_simclr_run_reports_the_online_probe(simclr_run):
    trainer, result, run_dir = simclr_run
    written = json.loads((run_dir / "result.json").read_text())
    assert written["status"] == "completed"
    metrics = written["metrics"]
    assert {"eval/online_probe/top1", "eval/online_probe/loss", "eval/feature_std"} <= set(metrics)
    assert 0.0 <= metrics["eval/online_probe/top1"] <= 1.0 and metrics["eval/feature_std"] > 0
    train = written["train_metrics"]
    for name in ("probe_accuracy", "probe_loss", "ssl_loss", "contrastive_accuracy"):
        assert f"train/{name}" in train
    # the total loss is the method's loss plus the probe's cross-entropy
    assert train["train/loss"] == pytest.approx(train["train/ssl_loss"] + train["train/probe_loss"], rel=1e-5)
    assert written["best_step"] is not None  # checkpoint.best_metric=eval/online_probe/top1 ranked the saves
    # the probe learns: its evaluation loss went down over the run
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probe_losses = [r["eval/online_probe/loss"] for r in evals if "eval/online_probe/loss" in r]
    assert len(probe_losses) == 4 and probe_losses[-1] < probe_losses[0]


def test_online_probe_metric_equals_a_computation_outside_the_trainer(simclr_run):
    trainer, result, _ = simclr_run
    split = trainer.eval_split
    images = np.stack([split[i]["image"] for i in range(len(split))])
    labels = np.stack([split[i]["label"] for i in range(len(split))])
    system = nnx.merge(trainer.eval_graphdef, _local(trainer.state.params), _local(trainer.state.rest))
    x = prepare_images({"image": jnp.asarray(images)}, trainer.info, jnp.float32)["image"]
    features = np.asarray(system.model.features(x), np.float64)  # eval mode: BatchNorm running statistics
    kernel = np.asarray(system.objective.probe.linear.kernel[...], np.float64)
    bias = np.asarray(system.objective.probe.linear.bias[...], np.float64)
    top1 = float(np.mean((features @ kernel + bias).argmax(-1) == labels))
    assert result["metrics"]["eval/online_probe/top1"] == pytest.approx(top1, abs=1e-6)
    normalized = features / np.linalg.norm(features, axis=1, keepdims=True)
    assert result["metrics"]["eval/feature_std"] == pytest.approx(normalized.std(axis=0).mean(), rel=1e-4)


def test_objective_eval_outputs_clashing_with_the_task_is_an_error(tmp_path, monkeypatch):
    """The hook is generic: here the task (classification) and a probe named like it would collide."""
    from prism.plugins.objectives import _ssl_common

    monkeypatch.setattr(_ssl_common, "PROBE_PREFIX", "")  # the probe reports "top1" and "loss" ...
    trainer = Trainer(ssl_config("simclr", "simclr", "train.steps=1"), tmp_path / "clash")
    with pytest.raises(ConfigError, match=r"both report evaluation metric\(s\) \['loss'\]"):
        trainer.evaluate()  # ... and classification reports "loss" too


def test_simclr_without_views_fails_naming_the_augment_preset(tmp_path):
    cfg = compose([*FAST, "objective=simclr", *SMALL_HEADS, *QUIET])  # augment=none: no views
    with pytest.raises(ConfigError, match="add augment=simclr"):
        Trainer(cfg, tmp_path / "noviews").fit()


def _named(state_part, *keys):
    for key in keys:
        state_part = state_part[key]
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(state_part)]


def test_byol_ema_target_follows_the_formula_in_the_trainer(tmp_path):
    cfg = ssl_config("byol", "byol", "train.steps=10", "objective.tau_base=0.9", "checkpoint.enabled=false")
    trainer = Trainer(cfg, tmp_path / "byol")
    total = trainer.micro_steps
    system = nnx.merge(trainer.graphdef, _local(trainer.state.params), _local(trainer.state.rest))
    assert system.objective.total_steps == total == 10  # passed by the trainer (a builder keyword)
    # the target lives in the state's rest, never in the parameters the optimizer sees
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    assert {type(v) for v in jax.tree.leaves(trainer.state.params, is_leaf=is_var)} == {nnx.Param}
    assert "target_backbone" in trainer.state.rest["objective"]
    assert "target_backbone" not in trainer.state.params["objective"]

    data = train_iterator(trainer.train_split, global_batch=32, host=trainer.host, seed=0, workers=0)
    steps_before = 3
    for _ in range(steps_before):  # move the online weights away from the (copied) initial target
        trainer.state, _ = trainer.programs.step(trainer.state, parallel.global_batch(trainer.mesh, next(data)))
    before = jax.device_get(trainer.state)
    assert int(before.rest["objective"]["ema_step"][...]) == steps_before
    online_model, online_proj = _named(before.params, "model"), _named(before.params, "objective", "projector")
    target_model = _named(before.rest, "objective", "target_backbone")
    target_proj = _named(before.rest, "objective", "target_projector")
    assert [x.shape for x in online_model] == [x.shape for x in target_model]
    assert any(np.abs(o - t).max() > 1e-4 for o, t in zip(online_model, target_model, strict=True))

    trainer.state, logs = trainer.programs.step(trainer.state, parallel.global_batch(trainer.mesh, next(data)))
    after = jax.device_get(trainer.state)
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * steps_before / total) + 1) / 2
    assert float(logs["train/tau"]) == pytest.approx(tau, rel=1e-6)
    for old_target, online, new_target in [
        *zip(target_model, online_model, _named(after.rest, "objective", "target_backbone"), strict=True),
        *zip(target_proj, online_proj, _named(after.rest, "objective", "target_projector"), strict=True),
    ]:
        np.testing.assert_allclose(new_target, tau * old_target + (1 - tau) * online, rtol=1e-5, atol=1e-7)
    assert int(after.rest["objective"]["ema_step"][...]) == steps_before + 1
    # the optimizer moved the online weights, not the targets (they changed only by the formula above)
    assert any(np.abs(a - b).max() > 0 for a, b in zip(_named(after.params, "model"), online_model, strict=True))
    assert all(isinstance(v, EMATarget) for v in jax.tree.leaves(after.rest["objective"]["target_backbone"],
                                                                  is_leaf=is_var))


@pytest.mark.parametrize("objective, augment", [("byol", "byol"), ("vicreg", "byol")])
def test_method_trains_and_reports_the_probe(objective, augment, tmp_path):
    # BYOL with the EMA test's tau_base: the same train step program, so it comes from the compilation cache
    extra = ["objective.tau_base=0.9"] if objective == "byol" else []
    cfg = ssl_config(objective, augment, "train.steps=10", "train.eval_every=10", "task=ssl",
                     "checkpoint.best_metric=eval/online_probe/top1", *extra)
    trainer = Trainer(cfg, tmp_path / objective)
    result = trainer.fit()
    assert result["status"] == "completed"
    assert "eval/online_probe/top1" in result["metrics"] and "train/probe_accuracy" in result["train_metrics"]
    assert np.isfinite(result["train_metrics"]["train/ssl_loss"])
    # the objective's state (BYOL: EMA target and its step) is checkpointed and restored with the run
    resumed = Trainer(cfg, tmp_path / objective)
    assert resumed.fit()["metrics"] == result["metrics"]
    for a, b in zip(jax.tree.leaves(trainer.state.rest), jax.tree.leaves(resumed.state.rest), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- presets ------------------------------------------------------------------------------------

def _views_crop_sizes(cfg) -> list[list[int]]:
    return [list(op["size"]) for view in cfg.augment.views for op in view if op["name"] == "random_resized_crop"]


@pytest.mark.parametrize("name, objective", [("simclr_fashion_mnist", "simclr"), ("byol_fashion_mnist", "byol")])
def test_fashion_mnist_presets_compose(name, objective):
    cfg = compose([f"+experiment={name}"])
    assert cfg.objective.name == objective and cfg.model.name == "simple_cnn" and cfg.task.name == "ssl"
    assert cfg.dataset.name == "fashion_mnist_local"
    assert _views_crop_sizes(cfg) == [[28, 28], [28, 28]]
    assert cfg.checkpoint.best_metric == "eval/online_probe/top1"


@pytest.mark.parametrize("name, objective, lr, temperature", [("simclr_cifar10_resnet18", "simclr", 0.4, 0.2),
                                                               ("byol_cifar10_resnet18", "byol", 1.0, None)])
def test_cifar10_resnet18_presets_compose(name, objective, lr, temperature):
    if "resnet18" not in MODELS:
        pytest.skip("model resnet18 is not registered (plugins/models/resnet.py absent)")
    cfg = compose([f"+experiment={name}"])
    assert cfg.objective.name == objective and cfg.model.name == "resnet18" and cfg.model.stem == "cifar"
    assert cfg.dataset.name == "image_folder" and cfg.loader.placement == "device"
    # the online probe every epoch, a kNN on frozen features every 10 epochs (the evaluators of the run)
    assert cfg.evals.main == {} and cfg.evals.knn.task == "knn" and cfg.evals.knn.every_epochs == 10
    assert cfg.optimizer.name == "lars" and cfg.optimizer.lr == lr and cfg.schedule.name == "warmup_cosine"
    assert cfg.train.batch_size == 256 and cfg.train.epochs == 1000
    assert _views_crop_sizes(cfg) == [[32, 32], [32, 32]]
    if temperature is not None:
        assert cfg.objective.temperature == temperature
    else:
        assert cfg.objective.tau_base == 0.99 and cfg.objective.pred_hidden_dim == 4096
