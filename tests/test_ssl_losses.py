"""Self-supervised losses against independent NumPy implementations (float64 loops), NT-Xent also with
the batch sharded over the 4 simulated devices; BYOL's target gets no gradient; objective errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.train import RUN_ONCE, System
from prism.plugins.models.simple_cnn import SimpleCNNConfig
from prism.plugins.objectives._ssl_common import EMATarget, cosine_tau
from prism.plugins.objectives.byol import BYOLConfig, build_byol, symmetric_byol_loss
from prism.plugins.objectives.simclr import SimCLRConfig, build_simclr, nt_xent
from prism.plugins.objectives.vicreg import VICRegConfig, build_vicreg, vicreg_terms

INFO = DataInfo(num_classes=10, image_shape=(8, 8, 1))


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_nt_xent(z1: np.ndarray, z2: np.ndarray, temperature: float) -> float:
    """SimCLR's loss, anchor by anchor: -log(exp(s_ip) / sum_{j != i} exp(s_ij)), s = cos / T."""
    z = _normalize(np.concatenate([z1, z2]).astype(np.float64))
    n2 = len(z)
    losses = []
    for i in range(n2):
        positive = (i + n2 // 2) % n2
        sims = np.array([z[i] @ z[j] / temperature for j in range(n2) if j != i])
        losses.append(-(z[i] @ z[positive] / temperature) + np.log(np.exp(sims).sum()))
    return float(np.mean(losses))


@pytest.mark.parametrize("n, d, temperature", [(8, 16, 0.5), (32, 8, 0.2), (4, 128, 0.07)])
def test_nt_xent_equals_numpy(n, d, temperature):
    rng = np.random.default_rng(n + d)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    loss, _ = jax.jit(nt_xent, static_argnums=2)(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                                 temperature)
    np.testing.assert_allclose(float(loss), numpy_nt_xent(z1, z2, temperature), rtol=2e-5)


def test_nt_xent_accuracy_counts_anchors_whose_positive_is_nearest():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 32))
    z2 = z1 + 0.01 * rng.normal(size=z1.shape)  # every positive is (by far) the nearest row
    _, accuracy = nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.5)
    assert float(accuracy) == 1.0
    z2[:4] = rng.normal(size=(4, 32)) * 10  # four pairs broken: 8 anchors are no longer matched
    _, accuracy = nt_xent(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), 0.5)
    assert float(accuracy) == pytest.approx(24 / 32)


def test_nt_xent_sharded_over_four_devices_uses_the_global_batch():
    devices = jax.devices()
    assert len(devices) == 4, "conftest simulates 4 CPU devices"
    n, d, temperature = 32, 16, 0.5
    rng = np.random.default_rng(7)
    z1, z2 = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    s1 = jax.device_put(jnp.asarray(z1, jnp.float32), sharding)
    s2 = jax.device_put(jnp.asarray(z2, jnp.float32), sharding)
    assert {shard.data.shape for shard in s1.addressable_shards} == {(n // 4, d)}  # really split 4 ways
    loss, _ = jax.jit(nt_xent, static_argnums=2)(s1, s2, temperature)
    expected = numpy_nt_xent(z1, z2, temperature)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    # per-device negatives only (what a naive data-parallel loss computes) would give another number
    local = np.mean([numpy_nt_xent(z1[i:i + n // 4], z2[i:i + n // 4], temperature) for i in range(0, n, n // 4)])
    assert abs(local - expected) > 0.1


def numpy_byol(p1, p2, t1, t2) -> float:
    cos = lambda a, b: np.sum(_normalize(a) * _normalize(b), axis=1)  # noqa: E731
    return float(np.mean(2 - 2 * cos(p1, t2)) + np.mean(2 - 2 * cos(p2, t1)))


def test_byol_loss_equals_numpy():
    rng = np.random.default_rng(1)
    p1, p2, t1, t2 = (rng.normal(size=(16, 24)) for _ in range(4))
    loss = symmetric_byol_loss(*(jnp.asarray(x, jnp.float32) for x in (p1, p2, t1, t2)))
    np.testing.assert_allclose(float(loss), numpy_byol(p1, p2, t1, t2), rtol=1e-5)
    # symmetric: swapping the views changes nothing; a perfect prediction costs nothing
    np.testing.assert_allclose(float(symmetric_byol_loss(*(jnp.asarray(x) for x in (p2, p1, t2, t1)))),
                               float(loss), rtol=1e-6)
    assert float(symmetric_byol_loss(*(jnp.asarray(x) for x in (t2, t1, t1, t2)))) == pytest.approx(0, abs=1e-6)


def numpy_vicreg(z1, z2, weights=(25.0, 25.0, 1.0)) -> float:
    n, d = z1.shape
    invariance = np.mean((z1 - z2) ** 2)
    variance = sum(np.mean(np.maximum(0, 1 - np.sqrt(z.var(axis=0, ddof=1) + 1e-4))) for z in (z1, z2))
    covariance = 0.0
    for z in (z1, z2):
        c = np.cov(z, rowvar=False)  # unbiased, (d, d)
        covariance += (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / d
    return weights[0] * invariance + weights[1] * variance + weights[2] * covariance


def test_vicreg_loss_equals_numpy():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(32, 12)) * 0.5, rng.normal(size=(32, 12)) * 2.0  # one view under the hinge
    terms = vicreg_terms(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32))
    loss = 25.0 * terms[0] + 25.0 * terms[1] + 1.0 * terms[2]
    np.testing.assert_allclose(float(loss), numpy_vicreg(z1, z2), rtol=1e-5)
    assert all(float(t) > 0 for t in terms)


def test_cosine_tau_schedule():
    total = 100
    assert float(cosine_tau(0, total, 0.996)) == pytest.approx(0.996)
    assert float(cosine_tau(50, total, 0.996)) == pytest.approx(0.998)
    assert float(cosine_tau(100, total, 0.996)) == pytest.approx(1.0)
    assert float(cosine_tau(250, total, 0.996)) == pytest.approx(1.0)  # clipped after the run
    k = 30
    assert float(cosine_tau(k, total, 0.99)) == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / total) + 1) / 2)


# -- objectives built directly (no trainer) ----------------------------------------------------------

def _model(seed: int = 0):
    """The backbone, initialised by one jitted program with the trainer's CPU init options (built eagerly,
    every initializer is a separate, slow XLA compile: ~10 s here)."""
    build = lambda: MODELS.get("simple_cnn").builder(SimpleCNNConfig(widths=[8, 16]), data=INFO,  # noqa: E731
                                                     rngs=nnx.Rngs(seed))
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()), compiler_options=RUN_ONCE)())


def _batch(n: int = 16, views: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = [jnp.asarray(rng.normal(size=(n, 8, 8, 1)), jnp.float32) for _ in range(views + 1)]
    batch = {"image": images[0], "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}
    if views:
        batch["views"] = images[1:]
    return batch


SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16}


@pytest.mark.parametrize("name, build, cfg", [
    ("simclr", build_simclr, SimCLRConfig(**SMALL)),
    ("byol", lambda cfg, **kw: build_byol(cfg, total_steps=10, **kw), BYOLConfig(**SMALL, pred_hidden_dim=32)),
    ("vicreg", build_vicreg, VICRegConfig(**SMALL)),
])
def test_missing_views_name_the_augment_preset(name, build, cfg):
    model = _model()
    objective = build(cfg, model=model, data=INFO, rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match=rf"objective '{name}' needs two augmented views.*augment="):
        objective(model, _batch(views=0), jax.random.key(0))
    with pytest.raises(ConfigError, match="got 1 views"):
        objective(model, _batch(views=1), jax.random.key(0))
    loss, metrics = objective(model, _batch(), jax.random.key(0))  # with two views it works
    assert np.isfinite(float(loss)) and {"ssl_loss", "probe_loss", "probe_accuracy"} <= set(metrics)


def test_simclr_error_names_augment_simclr():
    model = _model()
    objective = build_simclr(SimCLRConfig(**SMALL), model=model, data=INFO, rngs=nnx.Rngs(1))
    with pytest.raises(ConfigError, match="add augment=simclr"):
        objective(model, _batch(views=0), jax.random.key(0))


def test_objective_needs_a_backbone_with_features():
    class HeadOnly(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(64, 10, rngs=nnx.Rngs(0))

    with pytest.raises(ConfigError, match=r"needs a model with num_features, features\(\) \(FeatureModel"):
        build_simclr(SimCLRConfig(**SMALL), model=HeadOnly(), data=INFO, rngs=nnx.Rngs(1))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def test_byol_target_is_state_not_params_and_gets_no_gradient():
    model = _model()
    objective = build_byol(BYOLConfig(**SMALL, pred_hidden_dim=32), model=model, data=INFO, rngs=nnx.Rngs(1),
                           total_steps=10)
    system = System(model, objective)
    # the trainer's split: the EMA target is not among the parameters (so not in grads or the optimizer) ...
    _, params, rest = nnx.split(system, nnx.Param, ...)
    assert all(type(v) is nnx.Param for v in jax.tree.leaves(params, is_leaf=_is_var))
    targets_in_rest = [v for v in jax.tree.leaves(rest, is_leaf=_is_var) if isinstance(v, EMATarget)]
    n_backbone = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_projector = len(jax.tree.leaves(nnx.state(objective.projector, nnx.Param)))
    assert len(targets_in_rest) == n_backbone + n_projector  # ... but carried in the rest of the state
    # ... and no gradient reaches it: d loss / d target == 0 exactly, while the online side learns
    graphdef, params, targets, others = nnx.split(system, nnx.Param, EMATarget, ...)
    batch = _batch(n=16)

    def loss_fn(params, targets):
        s = nnx.merge(graphdef, params, targets, others, copy=True)
        return s.objective(s.model, batch, jax.random.key(0))[0]

    grad_params, grad_targets = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(params, targets)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_targets))
    assert len(jax.tree.leaves(grad_targets)) == n_backbone + n_projector
    for part in ("projector", "predictor"):
        assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grad_params["objective"][part]))
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grad_params["model"]["convs"]))


def test_byol_target_forward_leaves_online_batch_statistics_alone():
    """The target network runs on a copy: the online BatchNorm statistics see the two online passes only."""
    model, reference = _model(), _model()
    objective = build_byol(BYOLConfig(**SMALL, pred_hidden_dim=32, online_probe=False), model=model, data=INFO,
                           rngs=nnx.Rngs(1), total_steps=10)
    batch = _batch()
    objective(model, batch, jax.random.key(0))
    for view in batch["views"]:  # the same two train-mode passes on an identical model
        reference.features(view)
    for got, want in zip(jax.tree.leaves(nnx.state(model, nnx.BatchStat)),
                         jax.tree.leaves(nnx.state(reference, nnx.BatchStat)), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
