"""Offline evaluation of frozen backbones: weighted kNN against a NumPy implementation, the linear probe
against scikit-learn's logistic regression, and the whole chain on a tiny SimCLR run through the real CLI
(``prism eval task=knn``), with the metric recomputed outside the trainer and the results table built
from the written files."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, read_result, run_prism
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.config import compose
from prism.framework.errors import ConfigError
from prism.framework.evaluate import evaluate_run, evaluate_tasks
from prism.framework.registry import TASKS
from prism.framework.run import build_plugin
from prism.framework.steps import prepare_images
from prism.framework.train import Trainer
from prism.plugins.tasks import knn as knn_module
from prism.plugins.tasks.knn import KNN, KNNConfig, weighted_knn_scores
from prism.plugins.tasks.linear_probe import LinearProbe, LinearProbeConfig

sys.path.insert(0, str(REPO / "experiments"))
import ssl_table  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_weighted_knn(reference, reference_labels, query, k, temperature, num_classes):
    """Wu et al. 2018's vote, written directly: the k most similar rows vote exp(s/T) for their class."""
    similarity = query.astype(np.float64) @ reference.astype(np.float64).T
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    scores = np.zeros((len(query), num_classes))
    for i in range(len(query)):
        np.add.at(scores[i], reference_labels[nearest[i]], weights[i])
    return scores


# -- kNN ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k, temperature", [(200, 0.07), (7, 0.5)])
def test_knn_equals_numpy(k, temperature, monkeypatch):
    rng = np.random.default_rng(0)
    reference = _unit(rng.normal(size=(700, 24))).astype(np.float32)
    labels = rng.integers(0, 12, size=700)
    query = _unit(rng.normal(size=(130, 24))).astype(np.float32)
    query_labels = rng.integers(0, 12, size=130)
    monkeypatch.setattr(knn_module, "CHUNK_BYTES", 4 * 700 * 48)  # chunks of 48 rows: 3 chunks, the last padded
    scores = weighted_knn_scores(reference, labels, query, k=k, temperature=temperature, num_classes=12)
    expected = numpy_weighted_knn(reference, labels, query, k, temperature, 12)
    np.testing.assert_allclose(scores, expected, rtol=2e-5)
    np.testing.assert_array_equal(scores.argmax(1), expected.argmax(1))

    task = KNN(KNNConfig(k=k, temperature=temperature), num_classes=12)
    metrics = task.summarize({"features": query, "label": query_labels}, reference={"features": reference,
                                                                                     "label": labels})
    top5 = np.argsort(-expected, axis=1, kind="stable")[:, :5]
    assert metrics == {"knn/top1": pytest.approx(np.mean(expected.argmax(1) == query_labels), abs=1e-12),
                       "knn/top5": pytest.approx(np.mean((top5 == query_labels[:, None]).any(1)), abs=1e-12)}


def test_knn_finds_the_nearest_class_and_caps_k():
    # 3 tight clusters: every query's neighbours share its class, so top-1 is exact even with k > n
    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(3, 16)))
    labels = np.repeat(np.arange(3), 20)
    reference = _unit(centres[labels] + 0.01 * rng.normal(size=(60, 16))).astype(np.float32)
    query_labels = np.array([0, 1, 2, 2, 1])
    query = _unit(centres[query_labels] + 0.01 * rng.normal(size=(5, 16))).astype(np.float32)
    metrics = KNN(KNNConfig(k=5), num_classes=3).summarize({"features": query, "label": query_labels},
                                                           reference={"features": reference, "label": labels})
    assert metrics == {"knn/top1": 1.0}  # 3 classes: no top-5
    capped = weighted_knn_scores(reference, labels, query, k=1000, temperature=0.07, num_classes=3)
    np.testing.assert_allclose(capped, numpy_weighted_knn(reference, labels, query, 60, 0.07, 3), rtol=2e-5)


# -- linear probe -------------------------------------------------------------------------------

def test_linear_probe_separates_linearly_separable_data():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(20, 8))
    z = rng.normal(size=(4000, 20))
    scores = np.sort(z @ w, axis=1)
    z = z[scores[:, -1] - scores[:, -2] > 1.0][:1200]  # a margin between the classes
    y = (z @ w).argmax(1)
    x = (z * 3.0 + 5.0).astype(np.float32)  # unstandardized on purpose
    for settings in ({}, {"optimizer": "adamw", "lr": 0.01, "weight_decay": 1e-4}):
        task = LinearProbe(LinearProbeConfig(**settings), num_classes=8)
        metrics = task.summarize({"features": x[1000:], "label": y[1000:]}, reference={"features": x[:1000],
                                                                                       "label": y[:1000]})
        assert metrics["linear_probe/train_top1"] >= 0.99 and metrics["linear_probe/top1"] >= 0.97, settings
    assert metrics["linear_probe/top5"] >= metrics["linear_probe/top1"]


def test_linear_probe_matches_sklearn_logistic_regression_on_digits():
    """The same standardized pixels; scikit-learn's L-BFGS softmax regression (C=1) as the reference."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x.astype(np.float32), y, test_size=0.2, stratify=y,
                                                        random_state=0)
    mean, std = x_train.mean(0), np.where(x_train.std(0) > 1e-6, x_train.std(0), 1.0)
    reference = LogisticRegression(max_iter=5000).fit((x_train - mean) / std, y_train)
    expected = reference.score((x_test - mean) / std, y_test)
    task = LinearProbe(LinearProbeConfig(), num_classes=10)  # the defaults: SGD, 100 epochs
    metrics = task.summarize({"features": x_test, "label": y_test}, reference={"features": x_train, "label": y_train})
    assert metrics["linear_probe/top1"] == pytest.approx(expected, abs=0.015)  # 360 test images: 5 or fewer apart


@pytest.mark.parametrize("task, override, message", [
    ("knn", "task.k=0", "task.k"), ("knn", "task.temperature=0", "task.temperature"),
    ("linear_probe", "task.optimizer=lbfgs", "task.optimizer must be one of sgd, adamw"),
    ("linear_probe", "task.epochs=0", "task.epochs"),
])
def test_bad_settings_are_named(task, override, message):
    cfg = compose([f"task={task}", override], validate=False)  # the task's own check (compose refuses it first)
    with pytest.raises(ConfigError, match=message):
        build_plugin(TASKS, cfg.task, data=DataInfo(num_classes=10, image_shape=(8, 8, 1)))


def test_summarize_without_reference_says_so():
    with pytest.raises(ConfigError, match="reference split"):
        KNN(KNNConfig(), 10).summarize({"features": np.ones((2, 3), np.float32), "label": np.zeros(2)})


# -- the chain on a real run --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    """A tiny SimCLR pre-training on digits (8x8 crops), checkpointed. Its optimizer settings are those of
    ``test_ssl_train``'s SimCLR run (a constant rate does not depend on the number of steps), so both runs
    have the same train step program and the second one takes it from the compilation cache."""
    from test_ssl_train import ssl_config

    run_dir = tmp_path_factory.mktemp("ssl_eval") / "simclr"
    cfg = ssl_config("simclr", "simclr", "task=ssl", "schedule=constant", "optimizer.lr=0.01", "train.steps=12",
                     "train.eval_every=12", "checkpoint.best_metric=", "checkpoint.async_save=false")
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    return trainer, run_dir


def _features(trainer, split, params) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of a whole split, computed outside the trainer's evaluation loop."""
    local = lambda tree: jax.tree.map(jnp.asarray, jax.device_get(tree))  # noqa: E731
    system = nnx.merge(trainer.eval_graphdef, local(params), local(trainer.state.rest))
    images = np.stack([split[i]["image"] for i in range(len(split))])
    labels = np.array([split[i]["label"] for i in range(len(split))])
    x = prepare_images({"image": jnp.asarray(images)}, trainer.info, jnp.float32)["image"]
    return np.asarray(system.model.features(x), np.float64), labels


def test_prism_eval_knn_through_the_cli(ssl_run):
    trainer, run_dir = ssl_run
    out = run_dir / "eval" / "knn"
    # the reference is the run's training split: here changed to its first half (a TFDS slice)
    proc = run_prism("eval", f"checkpoint={run_dir}", "task=knn", "task.k=20", "eval.step=latest",
                     "dataset.train_split='train[:50%]'", f"eval.out={out}", cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = read_result(out)
    assert result["mode"] == "offline" and result["task"] == "knn" and result["step"] == 12
    assert result["task_settings"]["k"] == 20 and result["task_settings"]["temperature"] == 0.07
    # the same number from features computed here and the NumPy vote
    half = trainer.source.split("train[:50%]")
    assert 0 < len(half) < len(trainer.train_split)
    train_x, train_y = _features(trainer, half, trainer.state.params)
    test_x, test_y = _features(trainer, trainer.eval_split, trainer.state.params)
    scores = numpy_weighted_knn(_unit(train_x), train_y, _unit(test_x), 20, 0.07, 10)
    assert result["metrics"]["eval/knn/top1"] == pytest.approx(np.mean(scores.argmax(1) == test_y), abs=1e-9)
    assert "eval/online_probe/top1" in result["metrics"]  # the objective's own probe is reported beside it


def test_linear_probe_and_the_untrained_baseline_then_the_table(ssl_run, tmp_path):
    trainer, run_dir = ssl_run
    probe_cfg = LinearProbeConfig(epochs=20)
    probe = ["task=linear_probe", "task.epochs=20"]
    trained = evaluate_run(run_dir, probe, step="latest", out_dir=run_dir / "eval" / "linear_probe")
    knn = evaluate_run(run_dir, ["task=knn", "task.k=20"], step="latest", out_dir=run_dir / "eval" / "knn")
    # the baseline as run.sh evaluates it: both tasks in one call, results in eval/init/<task>/
    init, knn_init = evaluate_tasks(run_dir, ["linear_probe", "knn"], ["task.epochs=20", "task.k=20"], step="init",
                                    out_dir=run_dir / "eval" / "init")
    assert trained["task_settings"]["probe_epochs"] == 20 and trained["step"] == 12 and init["step"] == "init"
    # each equals the probe trained here on features computed outside the evaluation loop: the trained
    # weights for the checkpoint, a fresh build of the same config (same seed) for init
    fresh = Trainer(trainer.cfg, tmp_path / "fresh")
    for result, source in ((trained, trainer), (init, fresh)):
        train_x, train_y = _features(source, source.train_split, source.state.params)
        test_x, test_y = _features(source, source.eval_split, source.state.params)
        expected = LinearProbe(probe_cfg, 10).summarize({"features": test_x, "label": test_y},
                                                        reference={"features": train_x, "label": train_y})
        assert result["metrics"]["eval/linear_probe/loss"] == pytest.approx(expected["linear_probe/loss"], rel=1e-3)
        assert result["metrics"]["eval/linear_probe/top1"] == pytest.approx(expected["linear_probe/top1"], abs=0.006)
    assert trained["metrics"]["eval/linear_probe/loss"] != pytest.approx(init["metrics"]["eval/linear_probe/loss"],
                                                                         rel=1e-3)

    readme = tmp_path / "README.md"
    readme.write_text(f"# Experiments\n\nintro\n\n{ssl_table.BEGIN}\nold table\n{ssl_table.END}\n\nafter\n")
    assert ssl_table.main([str(run_dir), "--record", str(tmp_path / "record"), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Experiments\n\nintro\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert len(rows) == 2 and rows[0].startswith("| [simclr](record/simclr)") and "random init" in rows[1]
    assert f"{100 * trained['metrics']['eval/linear_probe/top1']:.2f}%" in rows[0]
    assert f"{100 * init['metrics']['eval/linear_probe/top1']:.2f}%" in rows[1]
    assert f"{100 * knn['metrics']['eval/knn/top1']:.2f}%" in rows[0]
    assert f"{100 * knn_init['metrics']['eval/knn/top1']:.2f}%" in rows[1]
    assert "probe_epochs=20" in text and "k=20" in text
    probe_gain = 100 * (trained["metrics"]["eval/linear_probe/top1"] - init["metrics"]["eval/linear_probe/top1"])
    knn_gain = 100 * (knn["metrics"]["eval/knn/top1"] - knn_init["metrics"]["eval/knn/top1"])
    assert f"random-init baseline: simclr {probe_gain:+.2f} (linear probe), {knn_gain:+.2f} (kNN)." in text
    assert (tmp_path / "record" / "simclr" / "eval" / "knn" / "result.json").is_file()
    assert (tmp_path / "record" / "simclr" / "eval" / "init" / "knn" / "result.json").is_file()
    assert not (tmp_path / "record" / "simclr" / "checkpoints").exists()
    # idempotent: writing again gives the same file
    assert ssl_table.main([str(run_dir), "--record", str(tmp_path / "record"), "--write", str(readme)]) == 0
    assert readme.read_text() == text
