"""Built-in optimizers and schedules against independent NumPy implementations of their formulas."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from prism.framework.errors import ConfigError
from prism.framework.registry import OPTIMIZERS, SCHEDULES
from prism.plugins.optimizers.optax_optimizers import AdamWConfig, LAMBConfig, LARSConfig, SGDConfig
from prism.plugins.optimizers.schedules import ConstantConfig, CosineConfig, StepConfig, WarmupCosineConfig

OPTIMIZER_CONFIGS = {"sgd": SGDConfig, "adamw": AdamWConfig, "lars": LARSConfig, "lamb": LAMBConfig}
SCHEDULE_CONFIGS = {
    "constant": ConstantConfig,
    "step": StepConfig,
    "cosine": CosineConfig,
    "warmup_cosine": WarmupCosineConfig,
}
NO_BIAS_DECAY = {"dense": {"kernel": True, "bias": False}}
ATOL = RTOL = 1e-6


def _params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": rng.normal(size=(3, 2)).astype(np.float32),
            "bias": (rng.normal(size=(2,)) * 0.5).astype(np.float32),  # non-zero: trust ratios apply
        }
    }


def _grads(steps: int = 3) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                   "bias": rng.normal(size=(2,)).astype(np.float32)}}
        for _ in range(steps)
    ]


def _run_optax(tx: optax.GradientTransformation, params: dict, grads: list[dict]) -> dict:
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params)


def _np_params() -> dict:
    return jax.tree.map(lambda x: x.astype(np.float64), _params())


def _assert_tree_close(actual: dict, expected: dict) -> None:
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(actual["dense"][key], expected["dense"][key], atol=ATOL, rtol=RTOL,
                                   err_msg=key)


def _build(name: str, cfg, lr, mask):
    return OPTIMIZERS.build(name, cfg, learning_rate=lr, weight_decay_mask=mask)


# -- registry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,config", OPTIMIZER_CONFIGS.items())
def test_optimizer_registered(name, config):
    entry = OPTIMIZERS.get(name)
    assert entry.config is config
    assert entry.description and "\n" not in entry.description
    assert entry.module == "prism.plugins.optimizers.optax_optimizers"
    defaults = entry.default_config()
    assert isinstance(defaults.lr, float)  # the trainer hands cfg.lr to the schedule
    for f in dataclasses.fields(config):
        assert f.name in (config.__doc__ or ""), f"{name}: field {f.name} undocumented"
    tx = entry.builder(defaults, learning_rate=0.1, weight_decay_mask=None)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("name,config", SCHEDULE_CONFIGS.items())
def test_schedule_registered(name, config):
    entry = SCHEDULES.get(name)
    assert entry.config is config
    assert entry.description and "\n" not in entry.description
    for f in dataclasses.fields(config):
        assert f.name in (config.__doc__ or ""), f"{name}: field {f.name} undocumented"
    schedule = entry.builder(entry.default_config(), base_lr=0.1, total_steps=100)
    assert np.isfinite(float(schedule(0))) and np.isfinite(float(schedule(100)))


@pytest.mark.parametrize("config", [*OPTIMIZER_CONFIGS.values(), *SCHEDULE_CONFIGS.values()])
def test_configs_are_structured_config_compatible(config):
    structured = OmegaConf.structured(config)
    assert OmegaConf.to_object(structured) == config()


def test_builders_accept_dictconfig():
    cfg = OmegaConf.structured(StepConfig)
    cfg.milestones = [0.2, 0.6]
    schedule = SCHEDULES.build("step", cfg, base_lr=1.0, total_steps=10)
    assert [float(schedule(t)) for t in (1, 2, 6)] == pytest.approx([1.0, 0.1, 0.01])
    tx = OPTIMIZERS.build("adamw", OmegaConf.structured(AdamWConfig), learning_rate=schedule,
                          weight_decay_mask=NO_BIAS_DECAY)
    _run_optax(tx, _params(), _grads(1))


# -- SGD --------------------------------------------------------------------------------------------


def _np_sgd(params, grads, lrs, mu, nesterov, wd, mask=None):
    """torch.optim.SGD (dampening 0): v = mu*v + g + wd*p; p -= lr*(v or g + wd*p + mu*v)."""
    p = {k: v.copy() for k, v in params["dense"].items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for g_tree, lr in zip(grads, lrs, strict=True):
        for k in p:
            decay = wd if (mask is None or mask["dense"][k]) else 0.0
            g = g_tree["dense"][k] + decay * p[k]
            vel[k] = mu * vel[k] + g
            p[k] = p[k] - lr * ((g + mu * vel[k]) if nesterov else vel[k])
    return {"dense": p}


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_style_numpy(nesterov):
    cfg = SGDConfig(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    actual = _run_optax(_build("sgd", cfg, 0.1, None), _params(), _grads())
    expected = _np_sgd(_np_params(), _grads(), [0.1] * 3, 0.9, nesterov, 0.05)
    _assert_tree_close(actual, expected)
    # Nesterov really changes the result (the test would catch the flag being ignored).
    other = _np_sgd(_np_params(), _grads(), [0.1] * 3, 0.9, not nesterov, 0.05)
    assert not np.allclose(actual["dense"]["kernel"], other["dense"]["kernel"], atol=1e-3)


def test_sgd_with_schedule_and_mask():
    schedule = SCHEDULES.build("step", StepConfig(milestones=[0.3, 0.6], gamma=0.5), base_lr=0.2,
                               total_steps=5)
    lrs = [float(schedule(t)) for t in range(3)]  # optax counts updates from 0
    assert lrs == pytest.approx([0.2, 0.2, 0.1])
    cfg = SGDConfig(momentum=0.9, nesterov=True, weight_decay=0.1)
    actual = _run_optax(_build("sgd", cfg, schedule, NO_BIAS_DECAY), _params(), _grads())
    expected = _np_sgd(_np_params(), _grads(), lrs, 0.9, True, 0.1, mask=NO_BIAS_DECAY)
    _assert_tree_close(actual, expected)
    decayed = _np_sgd(_np_params(), _grads(), lrs, 0.9, True, 0.1)
    assert not np.allclose(actual["dense"]["bias"], decayed["dense"]["bias"], atol=1e-3)


def test_sgd_without_momentum_is_plain_gradient_descent():
    actual = _run_optax(_build("sgd", SGDConfig(momentum=0.0), 0.1, None), _params(), _grads())
    expected = _np_sgd(_np_params(), _grads(), [0.1] * 3, 0.0, False, 0.0)
    _assert_tree_close(actual, expected)


# -- AdamW ------------------------------------------------------------------------------------------


def _np_adamw(params, grads, lr, b1, b2, eps, wd, mask=None):
    """AdamW: bias-corrected Adam step plus decoupled decay wd*p, both scaled by lr."""
    p = {k: v.copy() for k, v in params["dense"].items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g_tree in enumerate(grads, start=1):
        for k in p:
            g = g_tree["dense"][k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = wd if (mask is None or mask["dense"][k]) else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay * p[k])
    return {"dense": p}


def test_adamw_matches_numpy_and_mask_matters():
    cfg = AdamWConfig(lr=0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.5)

    def mask_fn(params):  # the callable form of an optax mask
        return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "bias", params)

    actual = _run_optax(_build("adamw", cfg, 0.01, mask_fn), _params(), _grads())
    expected = _np_adamw(_np_params(), _grads(), 0.01, 0.9, 0.99, 1e-8, 0.5, mask=NO_BIAS_DECAY)
    _assert_tree_close(actual, expected)
    decayed = _np_adamw(_np_params(), _grads(), 0.01, 0.9, 0.99, 1e-8, 0.5)
    assert not np.allclose(actual["dense"]["bias"], decayed["dense"]["bias"], atol=1e-4)
    np.testing.assert_allclose(actual["dense"]["kernel"], decayed["dense"]["kernel"], atol=ATOL, rtol=RTOL)
    # mask=None decays everything.
    _assert_tree_close(_run_optax(_build("adamw", cfg, 0.01, None), _params(), _grads()), decayed)


# -- LARS -------------------------------------------------------------------------------------------


def _np_lars(params, grads, lr, mu, wd, tc, eps, mask=None):
    """optax.lars: u = g + wd*p; u *= tc*||p||/(||u||+eps) (1 if a norm is 0); v = mu*v - lr*u; p += v."""
    p = {k: v.copy() for k, v in params["dense"].items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    for g_tree in grads:
        for k in p:
            on = mask is None or mask["dense"][k]
            u = g_tree["dense"][k] + (wd * p[k] if on else 0.0)
            if on:
                p_norm, u_norm = np.linalg.norm(p[k]), np.linalg.norm(u)
                u = u * (1.0 if p_norm == 0 or u_norm == 0 else tc * p_norm / (u_norm + eps))
            vel[k] = mu * vel[k] - lr * u
            p[k] = p[k] + vel[k]
    return {"dense": p}


def test_lars_matches_numpy_and_mask_matters():
    cfg = LARSConfig(lr=1.0, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=1e-3)
    actual = _run_optax(_build("lars", cfg, 1.0, NO_BIAS_DECAY), _params(), _grads())
    expected = _np_lars(_np_params(), _grads(), 1.0, 0.9, 0.01, 0.02, 1e-3, mask=NO_BIAS_DECAY)
    _assert_tree_close(actual, expected)
    # The masked bias is neither decayed nor trust-scaled: plain momentum SGD on it.
    b = _np_params()["dense"]["bias"]
    g = [x["dense"]["bias"] for x in _grads()]
    plain = b - 1.0 * (g[0] + (g[1] + 0.9 * g[0]) + (g[2] + 0.9 * (g[1] + 0.9 * g[0])))
    np.testing.assert_allclose(actual["dense"]["bias"], plain, atol=ATOL, rtol=RTOL)
    unmasked = _run_optax(_build("lars", cfg, 1.0, None), _params(), _grads())
    _assert_tree_close(unmasked, _np_lars(_np_params(), _grads(), 1.0, 0.9, 0.01, 0.02, 1e-3))
    assert not np.allclose(unmasked["dense"]["bias"], actual["dense"]["bias"], atol=1e-2)


# -- LAMB -------------------------------------------------------------------------------------------


def _np_lamb(params, grads, lr, b1, b2, eps, wd, mask=None):
    """optax.lamb: u = adam(g) + wd*p (masked); u *= ||p||/||u|| (1 if a norm is 0); p -= lr*u."""
    p = {k: v.copy() for k, v in params["dense"].items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g_tree in enumerate(grads, start=1):
        for k in p:
            g = g_tree["dense"][k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            if mask is None or mask["dense"][k]:
                u = u + wd * p[k]
            p_norm, u_norm = np.linalg.norm(p[k]), np.linalg.norm(u)
            p[k] = p[k] - lr * u * (1.0 if p_norm == 0 or u_norm == 0 else p_norm / u_norm)
    return {"dense": p}


def test_lamb_matches_numpy_and_mask_matters():
    cfg = LAMBConfig(lr=0.01, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.5)
    actual = _run_optax(_build("lamb", cfg, 0.01, NO_BIAS_DECAY), _params(), _grads())
    expected = _np_lamb(_np_params(), _grads(), 0.01, 0.9, 0.999, 1e-6, 0.5, mask=NO_BIAS_DECAY)
    _assert_tree_close(actual, expected)
    decayed = _np_lamb(_np_params(), _grads(), 0.01, 0.9, 0.999, 1e-6, 0.5)
    assert not np.allclose(actual["dense"]["bias"], decayed["dense"]["bias"], atol=1e-4)
    _assert_tree_close(_run_optax(_build("lamb", cfg, 0.01, None), _params(), _grads()), decayed)


# -- optimizer validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,cfg,field",
    [
        ("sgd", SGDConfig(momentum=1.5), "optimizer.momentum"),
        ("sgd", SGDConfig(momentum=0.0, nesterov=True), "optimizer.nesterov"),
        ("sgd", SGDConfig(weight_decay=-1.0), "optimizer.weight_decay"),
        ("adamw", AdamWConfig(b2=1.0), "optimizer.b2"),
        ("lars", LARSConfig(trust_coefficient=0.0), "optimizer.trust_coefficient"),
        ("lamb", LAMBConfig(eps=-1.0), "optimizer.eps"),
    ],
)
def test_optimizer_bad_values_name_the_field(name, cfg, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        _build(name, cfg, 0.1, None)


# -- schedules --------------------------------------------------------------------------------------


def _values(schedule, steps):
    return np.array([float(schedule(t)) for t in steps])


def test_constant_schedule():
    schedule = SCHEDULES.build("constant", ConstantConfig(), base_lr=0.3, total_steps=50)
    np.testing.assert_allclose(_values(schedule, [0, 7, 50, 80]), 0.3, rtol=1e-6)
    warm = SCHEDULES.build("constant", ConstantConfig(warmup_steps=4), base_lr=0.4, total_steps=50)
    np.testing.assert_allclose(_values(warm, [0, 1, 2, 4, 5, 49]), [0.0, 0.1, 0.2, 0.4, 0.4, 0.4], rtol=1e-6)


def test_step_schedule_drops_at_milestones():
    cfg = StepConfig(milestones=[0.5, 0.75], gamma=0.1)
    schedule = SCHEDULES.build("step", cfg, base_lr=0.2, total_steps=100)
    steps = [0, 49, 50, 51, 74, 75, 99, 150]
    expected = [0.2, 0.2, 0.02, 0.02, 0.02, 0.002, 0.002, 0.002]
    np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-6)
    # Milestones that land on the same step both apply.
    tight = SCHEDULES.build("step", StepConfig(milestones=[0.5, 0.55], gamma=0.5), base_lr=1.0, total_steps=4)
    np.testing.assert_allclose(_values(tight, [1, 2, 3]), [1.0, 0.25, 0.25], rtol=1e-6)


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_schedule(final):
    total, base = 200, 0.5
    cfg = CosineConfig(final_lr_fraction=final)
    schedule = SCHEDULES.build("cosine", cfg, base_lr=base, total_steps=total)
    steps = [0, 1, 50, 100, 150, 199, 200, 260]
    expected = [base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
                for t in steps]
    np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "cfg,warmup",
    [
        (WarmupCosineConfig(), 5),  # 5% of 100 steps
        (WarmupCosineConfig(warmup_fraction=0.1, init_lr_fraction=0.1, final_lr_fraction=0.01), 10),
        (WarmupCosineConfig(warmup_fraction=0.5, warmup_steps=20, final_lr_fraction=0.2), 20),  # steps win
        (WarmupCosineConfig(warmup_fraction=0.0), 0),
    ],
)
def test_warmup_cosine_schedule(cfg, warmup):
    total, base = 100, 0.8
    init, end = cfg.init_lr_fraction * base, cfg.final_lr_fraction * base

    def closed_form(t):
        if t < warmup:
            return init + (base - init) * t / warmup
        s = min(t - warmup, total - warmup)
        return end + (base - end) * 0.5 * (1 + math.cos(math.pi * s / (total - warmup)))

    schedule = SCHEDULES.build("warmup_cosine", cfg, base_lr=base, total_steps=total)
    steps = sorted({0, 1, max(warmup - 1, 0), warmup, warmup + 1, 40, 75, 99, 100, 130})
    expected = [closed_form(t) for t in steps]
    np.testing.assert_allclose(_values(schedule, steps), expected, rtol=1e-5, atol=1e-7)
    assert float(schedule(warmup)) == pytest.approx(base)


@pytest.mark.parametrize(
    "name,cfg,field",
    [
        ("step", StepConfig(gamma=-0.1), "schedule.gamma"),
        ("step", StepConfig(milestones=[0.5, 1.2]), "schedule.milestones"),
        ("step", StepConfig(milestones=[0.0, 0.5]), "schedule.milestones"),
        ("step", StepConfig(milestones=[0.75, 0.5]), "schedule.milestones"),
        ("constant", ConstantConfig(warmup_steps=101), "schedule.warmup_steps"),
        ("constant", ConstantConfig(warmup_steps=-3), "schedule.warmup_steps"),
        ("cosine", CosineConfig(final_lr_fraction=-0.5), "schedule.final_lr_fraction"),
        ("warmup_cosine", WarmupCosineConfig(warmup_steps=100), "schedule.warmup_steps"),
        ("warmup_cosine", WarmupCosineConfig(warmup_steps=250), "schedule.warmup_steps"),
        ("warmup_cosine", WarmupCosineConfig(warmup_steps=-2), "schedule.warmup_steps"),
        ("warmup_cosine", WarmupCosineConfig(warmup_fraction=1.5), "schedule.warmup_fraction"),
        ("warmup_cosine", WarmupCosineConfig(init_lr_fraction=2.0), "schedule.init_lr_fraction"),
    ],
)
def test_schedule_bad_values_name_the_field(name, cfg, field):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        SCHEDULES.build(name, cfg, base_lr=0.1, total_steps=100)


def test_schedule_rejects_empty_run():
    with pytest.raises(ConfigError, match="total_steps"):
        SCHEDULES.build("cosine", CosineConfig(), base_lr=0.1, total_steps=0)
