"""Evaluation is exact: ``Trainer.evaluate`` over the whole test split (360 digits) equals a plain NumPy
computation on logits of every example, whatever the evaluation batch size (padding + mask), and
``train.max_eval_batches`` evaluates exactly that many global batches, in order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST
from flax import nnx

from prism.framework.config import compose
from prism.framework.steps import prepare_images
from prism.framework.train import Trainer

#: A short run that leaves a model far from constant predictions (so padding errors would show).
EVAL_RUN = [*FAST, "train.steps=30", "train.eval_every=30", "schedule=constant", "optimizer.lr=0.05",
            "train.eval_batch_size=64", "checkpoint.enabled=false", "logging.tensorboard=false",
            "logging.plots=false"]
N_TEST = 360


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    trainer = Trainer(compose(EVAL_RUN), tmp_path_factory.mktemp("eval_run"))
    trainer.fit()
    return trainer


def _evaluator(trained: Trainer, overrides: list[str], tmp_path) -> Trainer:
    """A Trainer built from ``overrides`` holding the trained state (no training of its own)."""
    trainer = Trainer(compose([*EVAL_RUN, *overrides]), tmp_path / "evaluator")
    trainer.state = trained.state
    return trainer


def _reference(trainer: Trainer) -> dict[str, np.ndarray]:
    """Per-example logits, labels and NumPy metrics over the whole test split, outside the trainer."""
    split = trainer.eval_split
    assert len(split) == N_TEST
    images = np.stack([split[i]["image"] for i in range(len(split))])
    labels = np.stack([split[i]["label"] for i in range(len(split))]).astype(np.int64)
    local = lambda tree: jax.tree.map(jnp.asarray, jax.device_get(tree))  # noqa: E731
    system = nnx.merge(trainer.eval_graphdef, local(trainer.state.params), local(trainer.state.rest))
    x = prepare_images({"image": jnp.asarray(images)}, trainer.info, jnp.float32)["image"]
    logits = np.asarray(system.model(x), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_softmax[np.arange(len(labels)), labels]
    correct = (logits.argmax(-1) == labels).astype(np.float64)
    top5 = (np.argsort(-logits, axis=-1)[:, :5] == labels[:, None]).any(-1).astype(np.float64)
    return {"logits": logits, "labels": labels, "loss": loss, "correct": correct, "top5": top5}


@pytest.fixture(scope="module")
def reference(trained):
    ref = _reference(trained)
    # the model predicts several classes and is neither hopeless nor perfect: a miscounted example shows
    assert len(np.unique(ref["logits"].argmax(-1))) >= 5
    assert 0.15 < ref["correct"].mean() < 0.99
    return ref


def _check(metrics: dict[str, float], ref: dict[str, np.ndarray], n: int) -> None:
    assert set(metrics) == {"eval/accuracy", "eval/loss", "eval/top5"}
    correct = ref["correct"][:n]
    assert round(metrics["eval/accuracy"] * n) == int(correct.sum())
    np.testing.assert_allclose(metrics["eval/accuracy"], correct.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["eval/top5"], ref["top5"][:n].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["eval/loss"], ref["loss"][:n].mean(), rtol=1e-5)


@pytest.mark.parametrize("eval_batch_size", [64, 8, 48])
def test_eval_over_whole_split_equals_numpy(trained, reference, eval_batch_size, tmp_path):
    # 360 = 5*64 + 40 = 45*8 = 7*48 + 24: the padded last batch must not count its copies of example 0
    padded = -(-N_TEST // eval_batch_size) * eval_batch_size
    if padded > N_TEST:  # the check is sensitive: counting the padding would move the loss past rtol
        with_padding = np.concatenate([reference["loss"], np.repeat(reference["loss"][:1], padded - N_TEST)])
        assert abs(with_padding.mean() - reference["loss"].mean()) > 1e-3 * reference["loss"].mean()
    trainer = trained if eval_batch_size == 64 else _evaluator(trained, [f"train.eval_batch_size={eval_batch_size}"],
                                                               tmp_path)
    assert trainer.eval_batch_size == eval_batch_size
    _check(trainer.evaluate(), reference, N_TEST)


def test_eval_batch_size_does_not_change_metrics(trained, tmp_path):
    a = trained.evaluate()
    b = _evaluator(trained, ["train.eval_batch_size=16"], tmp_path).evaluate()
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5)
    assert trained.evaluate() == a  # deterministic, and evaluation leaves the state alone


def test_max_eval_batches_evaluates_exactly_that_many_examples(trained, reference, tmp_path):
    trainer = _evaluator(trained, ["train.max_eval_batches=2"], tmp_path)
    metrics = trainer.evaluate()
    _check(metrics, reference, 2 * 64)
    # and not the whole split (the first 128 examples' loss differs from the mean over 360)
    assert abs(metrics["eval/loss"] - reference["loss"].mean()) > 1e-4


def test_eval_uses_running_batchnorm_statistics(trained, reference):
    """Eval-mode BatchNorm: per-example outputs do not depend on the rest of the batch."""
    split = trained.eval_split
    local = lambda tree: jax.tree.map(jnp.asarray, jax.device_get(tree))  # noqa: E731
    system = nnx.merge(trained.eval_graphdef, local(trained.state.params), local(trained.state.rest))
    x = prepare_images({"image": jnp.asarray(np.stack([split[i]["image"] for i in range(8)]))}, trained.info,
                       jnp.float32)["image"]
    np.testing.assert_allclose(np.asarray(system.model(x[:4])), reference["logits"][:4], rtol=1e-5, atol=1e-5)
