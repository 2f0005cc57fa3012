"""MoCo v3 and Barlow Twins: each loss against a plain NumPy implementation (float64 loops; also with the
batch sharded over the 4 simulated devices), MoCo v3's InfoNCE on a case computed by hand, its momentum
encoder (equal to the online network at the start, pretrained weights included, then the EMA formula with
tau from the run's step), and a short digits run of each method through the trainer.

The two runs share work: Barlow Twins trains first and its checkpoint is MoCo v3's ``model.pretrained``;
MoCo v3's run then serves the start, training and EMA checks (one train step program, run with
``train.steps_per_call=1`` so the EMA check calls the very program the run compiled)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from prism.framework.api import DataInfo
from prism.framework.config import compose
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.train import RUN_ONCE, Trainer
from prism.plugins.models.simple_cnn import SimpleCNNConfig
from prism.plugins.objectives._ssl_common import EMATarget
from prism.plugins.objectives.barlow_twins import BarlowTwinsConfig, barlow_twins_loss, build_barlow_twins
from prism.plugins.objectives.mocov3 import MoCoV3Config, build_mocov3, infonce, symmetric_infonce

INFO = DataInfo(num_classes=10, image_shape=(8, 8, 1))
SMALL = {"proj_hidden_dim": 32, "proj_output_dim": 16}


# -- NumPy references ----------------------------------------------------------------------------------

def numpy_ctr(q: np.ndarray, k: np.ndarray, temperature: float) -> float:
    """MoCo v3's ctr(q, k), query by query: 2T * mean_i -log(exp(s_ii) / sum_j exp(s_ij)), s = cos / T."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    losses = []
    for i in range(len(q)):
        sims = np.array([q[i] @ k[j] / temperature for j in range(len(k))])
        losses.append(-sims[i] + np.log(np.exp(sims).sum()))
    return float(2 * temperature * np.mean(losses))


def numpy_mocov3(q1, q2, k1, k2, temperature: float) -> float:
    return numpy_ctr(q1, k2, temperature) + numpy_ctr(q2, k1, temperature)


def numpy_barlow_twins(z1: np.ndarray, z2: np.ndarray, lamb: float, scale_loss: float) -> float:
    """Standardize each dimension over the batch (biased variance, eps 1e-5), C_ij = sum_b a_bi b_bj / N,
    then scale * (sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2), element by element."""
    n, d = z1.shape
    a, b = ((z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + 1e-5) for z in (z1, z2))
    total = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[r, i] * b[r, j] for r in range(n)) / n
            total += (1 - c) ** 2 if i == j else lamb * c ** 2
    return scale_loss * total


def _f32(*arrays: np.ndarray) -> list[jax.Array]:
    return [jnp.asarray(x, jnp.float32) for x in arrays]


@pytest.mark.parametrize("n, d, temperature", [(8, 16, 0.2), (32, 8, 1.0), (4, 64, 0.07)])
def test_mocov3_loss_equals_numpy(n, d, temperature):
    rng = np.random.default_rng(n + d)
    q1, q2, k1, k2 = (rng.normal(size=(n, d)) for _ in range(4))
    loss, _ = jax.jit(symmetric_infonce, static_argnums=4)(*_f32(q1, q2, k1, k2), temperature)
    np.testing.assert_allclose(float(loss), numpy_mocov3(q1, q2, k1, k2, temperature), rtol=1e-5)
    # asymmetric in q and k (each view's queries meet the *other* view's keys): swapping k1 and k2 differs
    swapped, _ = symmetric_infonce(*_f32(q1, q2, k2, k1), temperature)
    assert abs(float(swapped) - float(loss)) > 1e-3


def test_mocov3_infonce_on_a_case_computed_by_hand():
    # unnormalized inputs: q -> [[1, 0], [0, 1]], k -> [[1, 0], [1, 1]/sqrt(2)]; with T = 0.5 the logits
    # are [[2, sqrt2], [0, sqrt2]], the positives on the diagonal; the loss is 2T = 1 times the mean CE
    q, k = np.array([[2.0, 0.0], [0.0, 3.0]]), np.array([[5.0, 0.0], [1.0, 1.0]])
    r2 = math.sqrt(2)
    row0 = -2 + math.log(math.exp(2) + math.exp(r2))
    row1 = -r2 + math.log(math.exp(0) + math.exp(r2))
    loss, accuracy = infonce(*_f32(q, k), 0.5)
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert float(accuracy) == 1.0  # both rows score their positive highest (2 > sqrt2, sqrt2 > 0)
    # T = 1 on orthonormal pairs: each row -log(e / (e + 1)), times 2T = 2, for both directions
    eye = np.eye(2)
    total, _ = symmetric_infonce(*_f32(eye, eye, eye, eye), 1.0)
    assert float(total) == pytest.approx(2 * 2 * math.log(1 + math.exp(-1)), rel=1e-6)


@pytest.mark.parametrize("n, d, lamb, scale_loss", [(16, 8, 0.0051, 0.1), (32, 24, 0.5, 1.0)])
def test_barlow_twins_loss_equals_numpy(n, d, lamb, scale_loss):
    rng = np.random.default_rng(n * d)
    z1 = rng.normal(size=(n, d)) * 3.0 + 1.0  # not standardized: the loss must standardize it
    z2 = 0.5 * z1 + rng.normal(size=(n, d))  # correlated with z1: a diagonal term away from 1
    loss, on_diagonal, off_diagonal = jax.jit(barlow_twins_loss, static_argnums=(2, 3))(*_f32(z1, z2), lamb,
                                                                                        scale_loss)
    np.testing.assert_allclose(float(loss), numpy_barlow_twins(z1, z2, lamb, scale_loss), rtol=1e-5)
    np.testing.assert_allclose(float(loss), scale_loss * (float(on_diagonal) + lamb * float(off_diagonal)),
                               rtol=1e-6)
    assert float(on_diagonal) > 0.1 and float(off_diagonal) > 0.1


def test_barlow_twins_loss_vanishes_for_equal_decorrelated_views():
    z = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 4 + 2  # uncorrelated columns
    loss, _, _ = barlow_twins_loss(*_f32(z, z), 0.0051, 0.1)
    assert float(loss) == pytest.approx(0.0, abs=1e-8)  # C = I (up to the eps in the variance)
    loss, _, _ = barlow_twins_loss(*_f32(z, z[:, ::-1]), 0.0051, 0.1)  # dimensions swapped: C = [[0,1],[1,0]]
    assert float(loss) == pytest.approx(0.1 * (2 + 0.0051 * 2), rel=1e-4)


def _sharded(mesh_devices, *arrays: np.ndarray) -> list[jax.Array]:
    sharding = NamedSharding(Mesh(np.array(mesh_devices), ("data",)), P("data"))
    return [jax.device_put(x, sharding) for x in _f32(*arrays)]


@pytest.mark.parametrize("method", ["mocov3", "barlow_twins"])
def test_losses_sharded_over_four_devices_use_the_global_batch(method):
    devices = jax.devices()
    assert len(devices) == 4, "conftest simulates 4 CPU devices"
    n, d = 32, 8
    rng = np.random.default_rng(11)
    arrays = [rng.normal(size=(n, d)) for _ in range(4)]
    if method == "barlow_twins":  # correlated views, each device's rows shifted: global != per-device statistics
        arrays[1] = arrays[0] + 0.5 * arrays[1]
        arrays[:2] = [a + np.repeat(np.arange(4.0), n // 4)[:, None] for a in arrays[:2]]
    sharded = _sharded(devices, *arrays)
    assert {s.data.shape for s in sharded[0].addressable_shards} == {(n // 4, d)}  # really split 4 ways
    if method == "mocov3":
        loss = jax.jit(lambda *a: symmetric_infonce(*a, 0.2)[0])(*sharded)
        expected = numpy_mocov3(*arrays, 0.2)
        local = np.mean([numpy_mocov3(*(a[i:i + n // 4] for a in arrays), 0.2) for i in range(0, n, n // 4)])
    else:
        loss = jax.jit(lambda a, b: barlow_twins_loss(a, b, 0.0051, 0.1)[0])(*sharded[:2])
        expected = numpy_barlow_twins(*arrays[:2], 0.0051, 0.1)
        local = np.mean([numpy_barlow_twins(*(a[i:i + n // 4] for a in arrays[:2]), 0.0051, 0.1)
                         for i in range(0, n, n // 4)])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert abs(local - expected) > 0.05 * abs(expected)  # per-device statistics would give another number


# -- objectives built directly (no trainer) ----------------------------------------------------------

def _model(seed: int = 0) -> nnx.Module:
    """The digits backbone, initialised by one jitted program (eagerly, every initializer compiles apart)."""
    build = lambda: MODELS.get("simple_cnn").builder(SimpleCNNConfig(widths=[8, 16]), data=INFO,  # noqa: E731
                                                     rngs=nnx.Rngs(seed))
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()), compiler_options=RUN_ONCE)())


def _leaves(module: nnx.Module, kind=nnx.Param) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(module, kind))]


def test_mocov3_momentum_encoder_is_ema_state_equal_to_the_online_network():
    model = _model()
    objective = build_mocov3(MoCoV3Config(**SMALL, pred_hidden_dim=32), model=model, data=INFO,
                             rngs=nnx.Rngs(1), total_steps=10)
    assert objective.takes_step  # the core passes the run's step
    momentum = objective.momentum
    # EMA variables, not parameters: no gradient, no optimizer; the predictor has no momentum copy
    assert not jax.tree.leaves(nnx.state(momentum, nnx.Param))
    assert len(_leaves(momentum, EMATarget)) == len(_leaves(model)) + len(_leaves(objective.projector))
    for got, want in zip(_leaves(momentum, EMATarget), _leaves(model) + _leaves(objective.projector), strict=True):
        np.testing.assert_array_equal(got, want)
    # new model weights (what model.pretrained does): copy_model_weights makes the encoder follow them
    nnx.update(model, jax.tree.map(lambda x: x + 1.0, nnx.state(model, nnx.Param)))
    objective.copy_model_weights(model)
    for got, want in zip(_leaves(momentum.backbone, EMATarget), _leaves(model), strict=True):
        np.testing.assert_array_equal(got, want)
    # ... as copies: a shared buffer would be donated twice by the trainer's step (it crashed the process)
    copies = jax.tree.leaves(nnx.state(momentum, EMATarget))
    online = jax.tree.leaves(nnx.state(model, nnx.Param)) + jax.tree.leaves(nnx.state(objective.projector, nnx.Param))
    assert all(c.unsafe_buffer_pointer() != o.unsafe_buffer_pointer() for c, o in zip(copies, online, strict=True))


@pytest.mark.parametrize("name", ["mocov3", "barlow_twins"])
def test_missing_views_name_the_augment_preset(name):
    model = _model()
    if name == "mocov3":
        objective = build_mocov3(MoCoV3Config(**SMALL, pred_hidden_dim=32), model=model, data=INFO,
                                 rngs=nnx.Rngs(1), total_steps=10)
        call = lambda batch: objective(model, batch, jax.random.key(0), step=0)  # noqa: E731
    else:
        objective = build_barlow_twins(BarlowTwinsConfig(**SMALL), model=model, data=INFO, rngs=nnx.Rngs(1))
        call = lambda batch: objective(model, batch, jax.random.key(0))  # noqa: E731
    image = jnp.zeros((4, 8, 8, 1))
    with pytest.raises(ConfigError, match=rf"objective '{name}' needs two augmented views.*add augment=byol"):
        call({"image": image, "label": jnp.zeros(4, jnp.int32)})


def test_mocov3_tau_schedule_needs_ordered_bounds():
    with pytest.raises(ConfigError, match="tau_base <= tau_final"):
        build_mocov3(MoCoV3Config(**SMALL, tau_base=1.0, tau_final=0.9), model=_model(), data=INFO,
                     rngs=nnx.Rngs(1), total_steps=10)


# -- through the trainer, on digits ------------------------------------------------------------------

STEPS = 10
TAU_BASE = 0.9


def ssl_config(objective: str, *overrides: str):
    """A digits run of ``objective`` with ``augment=byol``'s crops resized to the 8x8 images; one step per
    call on the device-resident data (so the run's own program serves the EMA check); a constant learning
    rate (the optimizer's schedule counts its own steps: a decayed one would not move the weights after
    the run)."""
    cfg = compose([*FAST, f"objective={objective}", "augment=byol", *(f"objective.{k}={v}" for k, v in SMALL.items()),
                   "logging.tensorboard=false", "logging.plots=false", "loader.placement=device",
                   "train.steps_per_call=1", f"train.steps={STEPS}", f"train.eval_every={STEPS}", "task=ssl",
                   "checkpoint.best_metric=eval/online_probe/top1", "schedule=constant",
                   *overrides])
    for view in cfg.augment.views:
        for op in view:
            if op.name == "random_resized_crop":
                op.size, op.scale = [8, 8], [0.5, 1.0]
    return cfg


def _flat(tree) -> list[np.ndarray]:
    """The leaves of ``tree`` as float64 NumPy *copies*: ``jax.device_get`` on the CPU may return views of the
    device buffers, which the trainer's step (donating its state) then overwrites."""
    return [np.array(x, np.float64) for x in jax.tree.leaves(jax.device_get(tree))]


def _parts(state) -> dict[str, list[np.ndarray]]:
    """Copies of the online backbone and projector and of their momentum counterparts in a train state."""
    momentum = state.rest["objective"]["momentum"]
    return {"backbone": _flat(state.params["model"]), "projector": _flat(state.params["objective"]["projector"]),
            "momentum_backbone": _flat(momentum["backbone"]), "momentum_projector": _flat(momentum["projector"])}


@pytest.fixture(scope="module")
def barlow_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("barlow_twins")
    trainer = Trainer(ssl_config("barlow_twins"), run_dir)
    return trainer, trainer.fit(), run_dir


@pytest.fixture(scope="module")
def mocov3_run(tmp_path_factory, barlow_run):
    """MoCo v3 from the Barlow Twins run's weights; also returns the state as built (before any step)."""
    _, _, pretrained = barlow_run
    cfg = ssl_config("mocov3", "objective.pred_hidden_dim=32", f"objective.tau_base={TAU_BASE}",
                     f"model.pretrained={pretrained}", "checkpoint.enabled=false")
    trainer = Trainer(cfg, tmp_path_factory.mktemp("mocov3"))
    initial = _parts(trainer.state)
    return trainer, trainer.fit(), initial


def _check_trained(result: dict, method_metrics: tuple[str, ...]) -> None:
    assert result["status"] == "completed"
    assert 0.0 <= result["metrics"]["eval/online_probe/top1"] <= 1.0
    train = result["train_metrics"]
    assert np.isfinite(train["train/ssl_loss"]) and np.isfinite(train["train/loss"])
    for name in ("probe_accuracy", "probe_loss", *method_metrics):
        assert f"train/{name}" in train


def test_barlow_twins_trains_and_reports_the_probe(barlow_run):
    trainer, result, _ = barlow_run
    _check_trained(result, ("on_diagonal", "off_diagonal"))
    train = result["train_metrics"]
    assert train["train/ssl_loss"] == pytest.approx(
        0.1 * (train["train/on_diagonal"] + 0.0051 * train["train/off_diagonal"]), rel=1e-4)


def test_mocov3_trains_and_reports_the_probe(mocov3_run):
    trainer, result, _ = mocov3_run
    _check_trained(result, ("contrastive_accuracy", "tau"))
    assert trainer.pretrained is not None and trainer.pretrained.loaded > 0


def test_mocov3_momentum_encoder_starts_as_the_pretrained_network(barlow_run, mocov3_run):
    barlow, _, _ = barlow_run
    _, _, initial = mocov3_run
    loaded = _flat(barlow.state.params["model"])  # the Barlow Twins run's final weights
    assert len(initial["momentum_backbone"]) == len(initial["backbone"]) == len(loaded)
    for m, o, pre in zip(initial["momentum_backbone"], initial["backbone"], loaded, strict=True):
        np.testing.assert_array_equal(o, pre)
        np.testing.assert_array_equal(m, o)  # not the random weights the encoder was built from
    for m, o in zip(initial["momentum_projector"], initial["projector"], strict=True):
        np.testing.assert_array_equal(m, o)


def test_mocov3_momentum_follows_the_ema_formula_with_tau_of_the_run_step(mocov3_run):
    trainer, _, _ = mocov3_run
    system = nnx.merge(trainer.graphdef, *(jax.tree.map(jnp.asarray, jax.device_get(part))
                                           for part in (trainer.state.params, trainer.state.rest)))
    assert system.objective.total_steps == trainer.micro_steps == STEPS  # passed by the trainer
    step = 3  # the run's step drives tau: set it, then take one step with the run's own program
    trainer.state = trainer.state._replace(step=jax.device_put(np.int32(step), trainer.state.step.sharding))
    before = _parts(trainer.state)
    batch = trainer.resident(trainer.cfg.dataset.train_split).batch(np.arange(trainer.host.per_host_batch))
    trainer.state, logs = trainer.programs.step(trainer.state, batch)
    after = _parts(trainer.state)
    tau = 1 - (1 - TAU_BASE) * (math.cos(math.pi * step / STEPS) + 1) / 2
    assert float(logs["train/tau"]) == pytest.approx(tau, rel=1e-6)
    assert int(trainer.state.step) == step + 1
    for part in ("backbone", "projector"):
        old, online, new = before[f"momentum_{part}"], before[part], after[f"momentum_{part}"]
        assert any(np.abs(o - t).max() > 1e-4 for o, t in zip(online, old, strict=True))  # a real move
        for old_t, o, new_t in zip(old, online, new, strict=True):
            np.testing.assert_allclose(new_t, tau * old_t + (1 - tau) * o, rtol=1e-5, atol=1e-7)
        # the optimizer moved the online weights (the momentum copy changed only by the formula above)
        assert any(np.abs(a - b).max() > 0 for a, b in zip(after[part], online, strict=True))
    assert "momentum" not in trainer.state.params["objective"]  # state, not parameters
