"""What the core adds around every optimizer, checked on real train steps: gradient accumulation,
global-norm clipping, the parameter EMA (and evaluation with it), the weight-decay mask, and bf16
compute with float32 parameters.

Gradient accumulation, clipping and EMA use a BatchNorm-free linear test model: with BatchNorm the
statistics of two micro-batches of 32 differ from those of one batch of 64, so accumulation is only
an exact equivalence for models whose per-example loss does not depend on the rest of the batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import FAST
from flax import nnx
from hydra.core.config_store import ConfigStore
from jax.extend import core as jax_core

from prism.framework import parallel
from prism.framework.config import compose
from prism.framework.data import train_iterator
from prism.framework.logging import read_metrics
from prism.framework.optim import build_optimizer, decay_mask
from prism.framework.registry import MODELS
from prism.framework.steps import prepare_images
from prism.framework.train import Trainer

QUIET = ["logging.progress=false", "logging.tensorboard=false", "logging.plots=false", "checkpoint.enabled=false"]


class TinyLinear(nnx.Module):
    """Flatten -> linear: no BatchNorm, no dropout."""

    def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs) -> None:
        self.head = nnx.Linear(in_features, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(x.reshape(x.shape[0], -1))


def build_tiny_linear(*, data, rngs: nnx.Rngs) -> TinyLinear:
    return TinyLinear(math.prod(data.image_shape), data.num_classes, rngs=rngs)


@pytest.fixture(scope="module", autouse=True)
def tiny_linear_model():
    MODELS.register("test_linear")(build_tiny_linear)
    yield
    MODELS.unregister("test_linear")
    ConfigStore.instance().repo.get("model", {}).pop("test_linear.yaml", None)  # stored by compose()


#: SGD with momentum, constant rate, no weight decay, on the linear model.
LINEAR = [*QUIET, "model=test_linear", "train.batch_size=32", "train.steps=5", "train.eval_every=5", "optimizer=sgd",
          "optimizer.lr=0.1", "optimizer.momentum=0.9", "optimizer.weight_decay=0", "schedule=constant"]


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), jax.device_get(tree))


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(_host(tree))]


def _norm(leaves: list[np.ndarray]) -> float:
    return float(np.sqrt(sum((x**2).sum() for x in leaves)))


def test_grad_accumulation_equals_the_large_batch(tmp_path):
    big = Trainer(compose([*LINEAR, "train.batch_size=64"]), tmp_path / "big")
    init = _leaves(big.state.params)
    big.fit()
    accum = Trainer(compose([*LINEAR, "train.batch_size=32", "train.grad_accum_steps=2"]), tmp_path / "accum")
    assert (accum.updates, accum.micro_steps, big.micro_steps) == (5, 10, 5)
    result = accum.fit()
    assert result["steps"] == 10

    p_big, p_accum = _leaves(big.state.params), _leaves(accum.state.params)
    assert _norm([a - b for a, b in zip(p_big, init, strict=True)]) > 1e-2  # they trained
    for a, b in zip(p_accum, p_big, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and not the same as 10 plain updates of batch 32
    plain = Trainer(compose([*LINEAR, "train.batch_size=32", "train.steps=10"]), tmp_path / "plain")
    plain.fit()
    assert _norm([a - b for a, b in zip(_leaves(plain.state.params), p_big, strict=True)]) > 1e-3


def _manual_steps(overrides: list[str], run_dir, n: int = 3):
    """Build a Trainer and take ``n`` train steps by hand; returns params/EMA/logs after each step."""
    trainer = Trainer(compose([*LINEAR, *overrides]), run_dir)
    cfg = trainer.cfg
    data = train_iterator(trainer.train_split, global_batch=cfg.train.batch_size, host=trainer.host, seed=cfg.seed)
    params, ema, logs = [_host(trainer.state.params)], [_host(trainer.state.ema_params)], []
    for _ in range(n):
        batch = parallel.global_batch(trainer.mesh, next(data))
        trainer.state, step_logs = trainer.programs.step(trainer.state, batch)
        params.append(_host(trainer.state.params))
        ema.append(_host(trainer.state.ema_params))
        logs.append({k: float(v) for k, v in jax.device_get(step_logs).items()})
    return trainer, params, ema, logs


@pytest.mark.parametrize("clip", [0.01, 1e6])
def test_grad_clipping_bounds_the_update(clip, tmp_path):
    lr = 0.1
    _, params, _, logs = _manual_steps([f"train.grad_clip_norm={clip}", "optimizer.momentum=0"], tmp_path, n=2)
    for k, step_logs in enumerate(logs):
        grad_norm = step_logs["train/grad_norm"]  # logged before clipping
        assert grad_norm > 10 * 0.01
        delta = _norm([a - b for a, b in zip(_leaves(params[k + 1]), _leaves(params[k]), strict=True)])
        # plain SGD: the update is lr times the (clipped) gradient
        np.testing.assert_allclose(delta, lr * min(clip, grad_norm), rtol=1e-4)


@pytest.fixture(scope="module")
def ema_steps(tmp_path_factory):
    return _manual_steps(["train.ema_decay=0.9"], tmp_path_factory.mktemp("ema"), n=3)


def test_ema_follows_the_formula(ema_steps):
    _, params, ema, _ = ema_steps
    assert ema[0] is not None
    for x, p in zip(_leaves(ema[0]), _leaves(params[0]), strict=True):
        np.testing.assert_array_equal(x, p)  # starts at the initial parameters
    expected = _leaves(params[0])
    for k in range(1, 4):
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, _leaves(params[k]), strict=True)]
        for got, want in zip(_leaves(ema[k]), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert _norm([a - b for a, b in zip(_leaves(ema[3]), _leaves(params[3]), strict=True)]) > 1e-3


def test_evaluation_uses_the_ema_parameters(ema_steps):
    trainer = ema_steps[0]
    split = trainer.eval_split
    images = jnp.asarray(np.stack([split[i]["image"] for i in range(len(split))]))
    labels = np.array([split[i]["label"] for i in range(len(split))])
    x = prepare_images({"image": images}, trainer.info, jnp.float32)["image"]

    def mean_loss(params) -> float:
        local = lambda t: jax.tree.map(jnp.asarray, jax.device_get(t))  # noqa: E731
        model = nnx.merge(trainer.eval_graphdef, local(params), local(trainer.state.rest)).model
        return float(optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean())

    with_ema, with_params = mean_loss(trainer.state.ema_params), mean_loss(trainer.state.params)
    assert abs(with_ema - with_params) > 1e-4
    np.testing.assert_allclose(trainer.evaluate()["eval/loss"], with_ema, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("skip_1d", [True, False])
def test_weight_decay_mask_excludes_1d_params(optimizer, skip_1d, tmp_path):
    overrides = [*FAST, *QUIET, f"optimizer={optimizer}", "optimizer.lr=0.1", "optimizer.weight_decay=0.5",
                 "schedule=constant", f"train.weight_decay_skip_1d={str(skip_1d).lower()}"]
    if optimizer == "sgd":
        overrides.append("optimizer.momentum=0")
    cfg = compose(overrides)
    params = _host(Trainer(cfg, tmp_path / "run").state.params)  # the real model: conv/BN/linear
    tx = build_optimizer(cfg, updates=10).tx
    zero = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)  # zero gradients: only weight decay moves
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    ndims = {jax.tree_util.keystr(p): np.ndim(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert sorted(set(ndims.values())) == [1, 2, 4]
    by_path = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, update in flat:
        name, p = jax.tree_util.keystr(path), np.asarray(by_path[path])
        if ndims[name] > 1 or not skip_1d:
            np.testing.assert_allclose(np.asarray(update), -0.1 * 0.5 * p, rtol=1e-5, atol=1e-8, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(update), 0.0, err_msg=name)
    mask = jax.tree.leaves(decay_mask(params))
    assert sum(mask) == sum(d > 1 for d in ndims.values())


def _equations(jaxpr):
    """Every equation of a (closed) jaxpr, descending into sub-jaxprs (jit, custom_vjp, scan, ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, jax_core.Jaxpr | jax_core.ClosedJaxpr):
                    yield from _equations(sub)


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bf16")
    trainer = Trainer(compose([*FAST, *QUIET, "precision=bf16", "train.steps=30", "train.log_every=1",
                               "schedule=constant", "optimizer.lr=0.01"]), run_dir)
    result = trainer.fit()
    return trainer, result, run_dir


def test_bf16_trains_with_float32_params(bf16_run):
    trainer, result, run_dir = bf16_run
    losses = [r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1
    assert np.isfinite(result["metrics"]["eval/loss"])
    for tree in (trainer.state.params, trainer.state.opt_state, trainer.state.rest):
        for leaf in jax.tree.leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32, leaf


def test_bf16_forward_and_backward_run_in_bf16(bf16_run):
    trainer = bf16_run[0]
    host = {"image": np.zeros((32, 8, 8, 1), np.uint8), "label": np.zeros((32,), np.int32)}
    batch = parallel.global_batch(trainer.mesh, host)
    jaxpr = jax.make_jaxpr(trainer.programs.step)(trainer.state, batch)
    convs = [e for e in _equations(jaxpr) if e.primitive.name == "conv_general_dilated"]
    dots = [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]
    assert len(convs) >= 2 and dots  # forward and gradient convolutions, the linear head
    for eqn in convs + dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
    outputs = jax.tree.leaves(jax.eval_shape(trainer.programs.step, trainer.state, batch))
    assert all(x.dtype != jnp.bfloat16 for x in outputs)  # the state and logs leave the step in float32


def test_fp32_forward_runs_in_float32(tmp_path):
    trainer = Trainer(compose([*FAST, *QUIET]), tmp_path / "fp32")
    host = {"image": np.zeros((32, 8, 8, 1), np.uint8), "label": np.zeros((32,), np.int32)}
    jaxpr = jax.make_jaxpr(trainer.programs.step)(trainer.state, parallel.global_batch(trainer.mesh, host))
    convs = [e for e in _equations(jaxpr) if e.primitive.name == "conv_general_dilated"]
    assert convs and all(v.aval.dtype == jnp.float32 for e in convs for v in e.invars)
