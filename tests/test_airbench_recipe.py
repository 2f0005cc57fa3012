"""The pieces of airbench's fast CIFAR-10 recipe, each against an explicit NumPy/optax computation: the
``random_translate`` transform, classification test-time augmentation, per-parameter lr multipliers,
freezing, lookahead, the ``triangle`` schedule, and the ``cifar10_airbench94`` preset (composes; a tiny
version trains on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from prism.framework.augment import Pipeline, build_transform
from prism.framework.config import compose
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm
from prism.framework.optim import build_optimizer, freeze_after, lookahead
from prism.framework.registry import SCHEDULES, TASKS

# -- random_translate ---------------------------------------------------------------------------------


def _image(h=13, w=11, c=3, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(h, w, c)).astype(np.float32)


def _offset_of(out: np.ndarray, padded: np.ndarray) -> list[tuple[int, int]]:
    """Every (dy, dx) whose window of ``padded`` equals ``out`` exactly."""
    h, w = out.shape[:2]
    return [(dy, dx) for dy in range(padded.shape[0] - h + 1) for dx in range(padded.shape[1] - w + 1)
            if np.array_equal(padded[dy:dy + h, dx:dx + w], out)]


@pytest.mark.parametrize("mode,np_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_random_translate_is_an_exact_window_of_the_padded_image(mode, np_mode):
    image, pad = _image(), 2
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    translate = jax.jit(build_transform({"name": "random_translate", "pad": pad, "mode": mode}))
    seen = set()
    for seed in range(150):
        out = np.asarray(translate({"image": jnp.asarray(image)}, jax.random.key(seed))["image"])
        assert out.shape == image.shape and out.dtype == image.dtype
        offsets = _offset_of(out, padded)
        assert len(offsets) == 1, offsets  # exactly one shifted window (random pixels: no ties)
        seen.add(offsets[0])
    assert seen == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}  # every shift occurs


def test_random_translate_per_example_offsets_and_seeded_determinism():
    images = np.stack([_image(seed=i) for i in range(16)])
    pipeline = Pipeline.from_config([{"name": "random_translate", "pad": 3}])
    first = np.asarray(jax.jit(pipeline)({"image": jnp.asarray(images)}, jax.random.key(7))["image"])
    again = np.asarray(jax.jit(pipeline)({"image": jnp.asarray(images)}, jax.random.key(7))["image"])
    other = np.asarray(jax.jit(pipeline)({"image": jnp.asarray(images)}, jax.random.key(8))["image"])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    offsets = []
    for image, out in zip(images, first, strict=True):
        found = _offset_of(out, np.pad(image, ((3, 3), (3, 3), (0, 0)), mode="reflect"))
        assert len(found) == 1
        offsets.append(found[0])
    assert len(set(offsets)) > 4  # each example draws its own shift


def test_random_translate_moves_mask_and_boxes_with_the_image():
    h = w = 24
    mask = np.zeros((h, w), np.int32)
    mask[6:14, 8:20] = 1
    example = {"image": jnp.asarray(np.stack([mask] * 3, -1).astype(np.float32)), "mask": jnp.asarray(mask),
               "boxes": jnp.asarray([[6 / h, 8 / w, 14 / h, 20 / w]], jnp.float32), "box_valid": jnp.array([True])}
    translate = build_transform({"name": "random_translate", "pad": 4, "mode": "zeros"})
    for seed in range(10):
        out = translate(example, jax.random.key(seed))
        m = np.asarray(out["mask"])
        np.testing.assert_array_equal(m, np.asarray(out["image"])[..., 0])
        ys, xs = np.nonzero(m)
        expected = [ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w]
        np.testing.assert_allclose(np.asarray(out["boxes"][0]), expected, atol=1e-6)


def test_random_translate_rejects_bad_values():
    with pytest.raises(ConfigError, match="mode"):
        build_transform({"name": "random_translate", "mode": "wrap"})
    with pytest.raises(ConfigError, match="pad"):
        build_transform({"name": "random_translate", "pad": -1})
    with pytest.raises(ValueError, match="reflect padding needs"):
        build_transform({"name": "random_translate", "pad": 5})({"image": jnp.zeros((4, 4, 3))}, jax.random.key(0))
    same = build_transform({"name": "random_translate", "pad": 0})({"image": jnp.asarray(_image())}, jax.random.key(0))
    np.testing.assert_array_equal(same["image"], _image())


# -- test-time augmentation ------------------------------------------------------------------------------


class _Linear(nnx.Module):
    """Logits linear in the pixels: neither flip- nor shift-invariant, so every TTA view counts."""

    def __init__(self, shape, classes, *, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (int(np.prod(shape)), classes)))

    def __call__(self, x):
        return x.reshape(x.shape[0], -1) @ self.w[...]


def _np_tta(w: np.ndarray, x: np.ndarray, tta: str) -> np.ndarray:
    """airbench's ``infer`` levels 0/1/2, written out in NumPy (NHWC: the width axis is 2)."""
    net = lambda v: v.reshape(len(v), -1) @ w  # noqa: E731
    mirror = lambda v: 0.5 * net(v) + 0.5 * net(v[:, :, ::-1])  # noqa: E731
    if tta == "none":
        return net(x)
    if tta == "flip":
        return mirror(x)
    h, wd = x.shape[1:3]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    translated = [padded[:, 0:h, 0:wd], padded[:, 2:h + 2, 2:wd + 2]]
    return 0.5 * mirror(x) + 0.5 * np.mean([mirror(t) for t in translated], axis=0)


@pytest.mark.parametrize("tta", ["none", "flip", "flip_translate"])
def test_classification_tta_matches_airbench_inference(tta):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6, 5, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=8)
    model = _Linear(x.shape[1:], 4, rngs=nnx.Rngs(0))
    data = type("Info", (), {"num_classes": 4})()
    task = TASKS.build("classification", TASKS.get("classification").config(top_k=2, tta=tta), data=data)
    assert task.describe() == {"tta": tta}
    out = jax.jit(lambda b: task.eval_outputs(model, b))({"image": jnp.asarray(x), "label": jnp.asarray(labels)})
    logits = _np_tta(np.asarray(model.w[...], np.float64), x.astype(np.float64), tta)
    log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    np.testing.assert_allclose(out["loss"], -log_probs[np.arange(8), labels], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(out["accuracy"], (logits.argmax(1) == labels).astype(np.float32))
    if tta != "none":  # the views matter: the result is not the plain model's
        plain = _np_tta(np.asarray(model.w[...], np.float64), x.astype(np.float64), "none")
        assert not np.allclose(logits, plain)


def test_classification_tta_rejects_unknown_mode():
    with pytest.raises(ConfigError, match="task.tta"):
        compose(["task.tta=mirror"])


# -- lr multipliers, freezing, lookahead ----------------------------------------------------------------


class _Net(nnx.Module):
    """Parameters named like airbench's: a biased conv, a BatchNorm's bias (no scale), a head kernel."""

    def __init__(self, *, rngs):
        self.whiten = nnx.Conv(3, 4, (2, 2), rngs=rngs)
        self.norm1 = BatchNorm(4, use_scale=False, rngs=rngs)
        self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


def _params():
    _, params, _ = nnx.split(_Net(rngs=nnx.Rngs(0)), nnx.Param, ...)
    return jax.tree.map(lambda p: p + 0.1, params)  # non-zero biases: weight decay shows


def _grads(params, seed):
    keys = iter(jax.random.split(jax.random.key(seed), 8))
    return jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _sgd_cfg(*extra):
    return compose(["optimizer=sgd", "schedule=constant", "optimizer.lr=0.1", "optimizer.weight_decay=0.01",
                    "train.weight_decay_skip_1d=false", *extra])


@pytest.mark.parametrize("pattern,matching", [("norm*.bias", {"norm1"}), ("bias", {"norm1", "whiten"})])
def test_lr_multiplier_scales_the_step_of_exactly_the_matching_leaves(pattern, matching):
    params = _params()
    grads = _grads(params, 1)
    tx = build_optimizer(_sgd_cfg("optimizer.momentum=0", f"+optimizer.lr_multipliers={{{pattern}:64.0}}"),
                         updates=10).tx
    updates, _ = tx.update(grads, tx.init(params), params)
    p, g, u = _flat(params), _flat(grads), _flat(updates)
    for name in p:
        plain = -0.1 * (g[name] + 0.01 * p[name])  # torch SGD, one group
        scaled = -0.1 * 64 * (g[name] + 0.01 / 64 * p[name])  # airbench's bias group: lr x64, same decay step
        hit = "bias" in name and any(f"'{m}'" in name for m in matching)
        np.testing.assert_allclose(u[name], scaled if hit else plain, rtol=1e-5, atol=1e-7, err_msg=name)
    assert sum("bias" in n and any(f"'{m}'" in n for m in matching) for n in p) == len(matching)


def test_lr_multipliers_match_torch_param_groups_with_nesterov_momentum():
    """Three steps of airbench's two torch.optim.SGD param groups (nesterov, momentum 0.85), in NumPy."""
    params = _params()
    cfg = _sgd_cfg("optimizer.momentum=0.85", "optimizer.nesterov=true", "+optimizer.lr_multipliers={norm*.bias:64.0}")
    tx = build_optimizer(cfg, updates=10).tx
    state, current = tx.init(params), params
    ref = _flat(params)
    buf = {k: np.zeros_like(v) for k, v in ref.items()}
    for step in range(3):
        grads = _grads(params, 10 + step)
        updates, state = tx.update(grads, state, current)
        current = optax.apply_updates(current, updates)
        for name, g in _flat(grads).items():
            lr = 0.1 * (64 if "norm1" in name else 1)
            d = g + (0.01 * 0.1 / lr) * ref[name]  # group weight_decay = wd / lr_group (airbench's train())
            buf[name] = 0.85 * buf[name] + d
            ref[name] = ref[name] - lr * (d + 0.85 * buf[name])
    for name, value in _flat(current).items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_lr_multiplier_pattern_that_matches_nothing_is_a_config_error():
    tx = build_optimizer(_sgd_cfg("+optimizer.lr_multipliers={norm*.scale:2.0}"), updates=10).tx
    with pytest.raises(ConfigError, match="lr_multipliers.*matches no parameter"):
        tx.init(_params())
    with pytest.raises(ConfigError, match="lr_multipliers"):
        build_optimizer(_sgd_cfg("+optimizer.lr_multipliers={bias:-1.0}"), updates=10)


def test_freeze_after_stops_exactly_the_matching_leaves():
    params = _params()
    tx = build_optimizer(_sgd_cfg("optimizer.momentum=0.9", "+optimizer.freeze_after={whiten.bias:0.4}"),
                         updates=10).tx
    state, history = tx.init(params), [_flat(params)]
    for step in range(10):
        updates, state = tx.update(_grads(params, step), state, params)
        params = optax.apply_updates(params, updates)
        history.append(_flat(params))
    for name in history[0]:
        moved = [not np.array_equal(a[name], b[name]) for a, b in zip(history, history[1:], strict=False)]
        assert moved == ([True] * 4 + [False] * 6 if "'whiten']['bias'" in name else [True] * 10), name
    assert isinstance(freeze_after({"x": 0.5}, 4), optax.GradientTransformation)


def _quadratic_grads(params, target):
    return jax.grad(lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target),
                                                                          strict=True)))(params)


def test_lookahead_on_plain_params_matches_optax_lookahead():
    params, target = _params(), jax.tree.map(lambda p: p * -2.0 + 1.0, _params())
    inner = optax.sgd(0.05, momentum=0.9)
    ours = lookahead(inner, 3, 0.4, total_updates=10_000)
    theirs = optax.lookahead(inner, sync_period=3, slow_step_size=0.4)
    p, s = params, ours.init(params)
    lp = optax.LookaheadParams.init_synced(params)
    ls = theirs.init(lp)
    for _ in range(11):
        u, s = ours.update(_quadratic_grads(p, target), s, p)
        p = optax.apply_updates(p, u)
        lu, ls = theirs.update(_quadratic_grads(lp.fast, target), ls, lp)
        lp = optax.apply_updates(lp, lu)
        for a, b in ((p, lp.fast), (s.slow, lp.slow)):
            for name, value in _flat(a).items():
                np.testing.assert_allclose(value, _flat(b)[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_lookahead_alpha_ramp_and_final_sync_match_airbench():
    """airbench's loop: every 5 steps ``ema.lerp_(net, 1 - decay); net.copy_(ema)`` with
    ``decay = 0.95**5 * (step / T)**3``, and ``net = ema`` after the last step (T = 13: not a sync step)."""
    total, k = 13, 5
    params, target = _params(), jax.tree.map(lambda p: p * -2.0 + 1.0, _params())
    tx = build_optimizer(_sgd_cfg("optimizer.momentum=0", "optimizer.weight_decay=0", "optimizer.lookahead_steps=5",
                                  f"optimizer.lookahead_alpha={1 - 0.95 ** 5}", "optimizer.lookahead_alpha_power=3"),
                         updates=total).tx
    state, p = tx.init(params), params
    net = _flat(params)
    tgt = _flat(target)
    ema = {n: v.copy() for n, v in net.items()}
    for step in range(1, total + 1):
        u, state = tx.update(_quadratic_grads(p, target), state, p)
        p = optax.apply_updates(p, u)
        for n in net:
            net[n] = net[n] - 0.1 * 2 * (net[n] - tgt[n])
        if step % k == 0:
            decay = 0.95 ** 5 * (step / total) ** 3
            for n in net:
                ema[n] = decay * ema[n] + (1 - decay) * net[n]
                net[n] = ema[n].copy()
        if step == total:
            net = {n: v.copy() for n, v in ema.items()}
        for n, value in _flat(p).items():
            np.testing.assert_allclose(value, net[n], rtol=1e-5, atol=1e-6, err_msg=f"step {step} {n}")


# -- triangle schedule --------------------------------------------------------------------------------------


def test_triangle_schedule_matches_airbench():
    total, start, peak, end = 476, 0.2, 0.23, 0.07
    cfg = SCHEDULES.get("triangle").config(start_fraction=start, peak_fraction=peak, end_fraction=end)
    schedule = SCHEDULES.build("triangle", cfg, base_lr=1.5, total_steps=total)
    xp, fp = [0, int(peak * total), total], [start, 1.0, end]  # airbench's triangle(): lines through these
    steps = np.arange(total + 1)
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(steps)), 1.5 * np.interp(steps, xp, fp), rtol=1e-5)
    assert float(schedule(total + 50)) == pytest.approx(1.5 * end)
    with pytest.raises(ConfigError, match="schedule.peak_fraction"):
        SCHEDULES.build("triangle", SCHEDULES.get("triangle").config(peak_fraction=1.5), base_lr=1.0, total_steps=10)


# -- the preset ---------------------------------------------------------------------------------------------


def test_airbench_preset_composes_with_airbench_hyperparameters():
    cfg = compose(["+experiment=cifar10_airbench94"])
    assert (cfg.model.name, cfg.dataset.name, cfg.optimizer.name, cfg.schedule.name) == (
        "airbench94", "image_folder", "sgd", "triangle")
    assert cfg.train.batch_size == 1024 and cfg.train.epochs == 9.9 and list(cfg.train.time_to) == [0.90, 0.94]
    assert cfg.optimizer.lr == pytest.approx(11.5 / (1 + 1 / (1 - 0.85)))
    assert cfg.optimizer.weight_decay == pytest.approx(0.0153 / 11.5, rel=1e-5)
    assert dict(cfg.optimizer.lr_multipliers) == {"norm*.bias": 64.0} and cfg.optimizer.nesterov
    assert cfg.optimizer.freeze_after["whiten.bias"] == pytest.approx(3 / 9.9, rel=1e-4)
    assert cfg.optimizer.lookahead_alpha == pytest.approx(1 - 0.95 ** 5)
    assert cfg.objective.label_smoothing == 0.2 and cfg.task.tta == "flip_translate"
    assert [op["name"] for op in cfg.augment.ops] == ["hflip", "random_translate"]
    assert cfg.precision == "bf16" and not cfg.checkpoint.enabled and cfg.loader.placement == "device"


def test_tiny_airbench_run_trains_on_cpu(tmp_path, monkeypatch):
    from prism.framework.train import Trainer

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in range(10):
            folder = tmp_path / "cifar" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(25 * c, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.setenv("PRISM_CIFAR10", str(tmp_path / "cifar"))
    cfg = compose(["+experiment=cifar10_airbench94", f"dataset.data_dir={tmp_path / 'tfds'}",
                   "model.widths=[8,16,16]", "train.steps=6", "train.batch_size=16", "train.eval_batch_size=20",
                   "train.eval_every=6", "logging.tensorboard=false", "logging.plots=false",
                   "optimizer.lookahead_steps=2"])
    assert cfg.dataset.path == str(tmp_path / "cifar")
    trainer = Trainer(cfg, tmp_path / "run")
    # the core fitted the whitening stem at the fresh start: fitting again on the same images changes nothing,
    # while the unfitted (identity-initialized) kernel differs
    from flax import nnx

    system = nnx.merge(trainer.graphdef, trainer.state.params, trainer.state.rest, copy=True)
    at_start = np.asarray(system.model.whiten.kernel[...])
    images = np.stack([np.asarray(trainer.train_split[i]["image"]) for i in range(len(trainer.train_split))])
    system.model.fit_to_data(images)
    np.testing.assert_allclose(at_start, np.asarray(system.model.whiten.kernel[...]), rtol=1e-5, atol=1e-6)
    unfitted = np.asarray(trainer.create_system(jax.random.key(cfg.seed)).model.whiten.kernel[...])
    assert not np.allclose(at_start, unfitted)
    before = jax.device_get(trainer.state.params)
    result = trainer.fit()
    assert result["status"] == "completed"
    assert np.isfinite(result["metrics"]["eval/loss"]) and 0 <= result["metrics"]["eval/accuracy"] <= 1
    after = jax.device_get(trainer.state.params)
    assert not np.array_equal(before["model"]["head"]["kernel"], after["model"]["head"]["kernel"])
    # the whitening kernel is no parameter: not in the trained tree at all
    assert "kernel" not in after["model"]["whiten"]
