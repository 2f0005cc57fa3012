"""The ``airbench94`` model: parameter count against airbench's torch module (counted by hand: torch is not
installed), the forward pass against a NumPy re-implementation of ``make_net94``, the frozen whitening kernel
(no ``nnx.Param``: no gradient), its fit to data (whitened patch covariance ~ identity) and its init."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from prism.framework.api import DataInfo
from prism.framework.config import compose
from prism.framework.model_summary import count_params
from prism.framework.registry import MODELS
from prism.plugins.models.airbench import Frozen

CIFAR = DataInfo(num_classes=10, image_shape=(32, 32, 3), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


def build(data: DataInfo = CIFAR, seed: int = 0, **overrides):
    cfg = dataclasses.replace(MODELS.get("airbench94").default_config(), **overrides)
    return MODELS.build("airbench94", cfg, data=data, rngs=nnx.Rngs(seed))


def test_registered_and_composes():
    entry = MODELS.get("airbench94")
    assert entry.module == "prism.plugins.models.airbench" and entry.description
    assert tuple(entry.metadata["default_image_shape"]) == (32, 32, 3)
    assert compose(["model=airbench94", "model.widths=[8,16,16]"]).model.widths == [8, 16, 16]


def test_parameter_count_matches_airbench_torch_module():
    # make_net94() with widths 64/256/256, counted from its layers (torch: sum(p.numel() for p in net.parameters())):
    whiten = 24 * 3 * 2 * 2 + 24  # Conv(3, 24, 2, bias=True)
    def group(cin, cout):  # conv1 (no bias) + norm1 (weight + bias) + conv2 + norm2
        return cin * cout * 9 + 2 * cout + cout * cout * 9 + 2 * cout
    torch_total = whiten + group(24, 64) + group(64, 256) + group(256, 256) + 256 * 10  # Linear(256, 10, bias=False)
    assert torch_total == 1_972_792
    # Not trained, so not nnx.Params here: the whitening kernel (requires_grad=False in airbench) and the BatchNorm
    # weights (requires_grad=False, fixed at 1: we build BatchNorm without a scale).
    frozen = 24 * 3 * 2 * 2 + 2 * (64 + 256 + 256)
    model = nnx.eval_shape(lambda: build())
    assert count_params(model) == torch_total - frozen == 1_971_352
    assert model.whiten.kernel.shape == (2, 2, 3, 24)


# -- forward pass against NumPy ----------------------------------------------------------------------------


def _np_conv(x, w, pad):
    """NHWC x HWIO cross-correlation, stride 1, symmetric zero ``pad``."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # n, h, w, c, kh, kw
    return np.einsum("nhwcij,ijco->nhwo", windows, w)


def _np_pool2(x):
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, :2 * h2, :2 * w2].reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


def _np_bn(x, bias, eps):  # training mode: batch statistics (biased variance), no scale
    return (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + eps) + bias


def _gelu(x):  # PyTorch's nn.GELU(): exact, erf-based
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_forward_matches_numpy_make_net94():
    model = build(widths=[4, 8, 8])
    rng = np.random.default_rng(0)
    for _, v in nnx.iter_graph(model):  # non-zero BN biases and a fitted whitening conv
        if isinstance(v, nnx.Param) and v[...].ndim == 1:
            v[...] = jnp.asarray(rng.normal(size=v.shape) * 0.3, jnp.float32)
    model.fit_to_data(rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8))
    x = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    model.train()
    out = np.asarray(model(jnp.asarray(x)))
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    h = _gelu(_np_conv(x.astype(np.float64), p(model.whiten.kernel), 0) + p(model.whiten.bias))
    for blk in model.blocks:
        h = _gelu(_np_bn(_np_pool2(_np_conv(h, p(blk.conv1.kernel), 1)), p(blk.norm1.bias), 1e-12))
        h = _gelu(_np_bn(_np_conv(h, p(blk.conv2.kernel), 1), p(blk.norm2.bias), 1e-12))
    assert h.shape[1:3] == (3, 3)  # 32 -> 31 -> 15 -> 7 -> 3: airbench's MaxPool2d(3) is a global max here
    expected = (h.max(axis=(1, 2)) @ p(model.head.kernel)) / 9
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)
    # BatchNorm running statistics: 0.6 * old + 0.4 * batch (airbench's momentum 0.6 = torch momentum 0.4)
    norm = model.blocks[2].norm2
    assert norm.scale is None and norm.momentum == pytest.approx(0.6) and norm.epsilon == 1e-12


def test_convs_start_as_partial_identity_like_airbench():
    model = build(widths=[32, 48, 8])
    for conv, cin in ((model.blocks[0].conv1, 24), (model.blocks[1].conv1, 32), (model.blocks[2].conv1, 48)):
        w = np.asarray(conv.kernel[...])
        n = min(cin, w.shape[-1])
        ident = np.zeros((3, 3, cin, n))
        ident[1, 1, np.arange(n), np.arange(n)] = 1
        np.testing.assert_array_equal(w[..., :n], ident)
        bound = 1 / np.sqrt(9 * cin)  # the rest: PyTorch's default U(+-1/sqrt(fan_in))
        if n < w.shape[-1]:
            assert 0 < np.abs(w[..., n:]).max() <= bound + 1e-7
    assert model.whiten.bias is not None and model.head.bias is None


# -- the frozen whitening layer ------------------------------------------------------------------------


def _correlated_images(n=40, seed=0) -> np.ndarray:
    """uint8 images with neighbouring pixels and channels correlated (as natural images)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 33, 33, 1)) * 0.7 + rng.normal(size=(n, 33, 33, 3)) * 0.5
    smooth = (base[:, 1:, 1:] + base[:, :-1, 1:] + base[:, 1:, :-1] + base[:, :-1, :-1]) / 4
    return np.clip(128 + 60 * smooth, 0, 255).astype(np.uint8)


def _np_patches(x: np.ndarray, k: int) -> np.ndarray:
    """Every k x k patch as a row (row, column, channel order), by explicit offsets."""
    n, h, w, c = x.shape
    cols = [x[:, dy:h - k + 1 + dy, dx:w - k + 1 + dx, :] for dy in range(k) for dx in range(k)]
    return np.stack(cols, axis=3).reshape(-1, k * k * c)


@pytest.mark.parametrize("eps", [5e-4, 1e-9])
def test_fit_to_data_whitens_the_patches(eps):
    model = build(whiten_eps=eps)
    images = _correlated_images()
    model.fit_to_data(images)
    x = (images / 255.0 - np.array(CIFAR.mean)) / np.array(CIFAR.std)
    out = np.asarray(model.whiten(jnp.asarray(x, jnp.float32)), np.float64)  # conv output before the GELU
    np.testing.assert_array_equal(np.asarray(model.whiten.bias[...]), 0.0)
    np.testing.assert_allclose(out[..., 12:], -out[..., :12], atol=1e-5)  # the negated copies
    rows = out[..., :12].reshape(-1, 12)
    cov = rows.T @ rows / len(rows)  # uncentred, as airbench's patch "covariance"
    patches = _np_patches(x, 2)
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    np.testing.assert_allclose(cov, np.diag(eigenvalues / (eigenvalues + eps)), atol=2e-4)
    assert eigenvalues.max() / eigenvalues.min() > 20  # the patches were far from white before
    if eps < 1e-6:
        np.testing.assert_allclose(cov, np.eye(12), atol=2e-4)
    else:
        assert np.abs(cov - np.eye(12)).max() < 0.1


def test_whitening_kernel_is_frozen_not_a_parameter():
    model = build(widths=[4, 8, 8])
    model.fit_to_data(_correlated_images(8))
    assert isinstance(model.whiten.kernel, Frozen) and not isinstance(model.whiten.kernel, nnx.Param)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert "kernel" not in params["whiten"] and "bias" in params["whiten"]
    kernel = np.asarray(model.whiten.kernel[...])

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(jnp.ones((4, 32, 32, 3))) ** 2)

    grads = jax.grad(loss)(params)
    assert float(jnp.abs(grads["whiten"]["bias"][...]).sum()) > 0  # the bias trains, the kernel has no gradient
    new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    model = nnx.merge(graphdef, new_params, rest)
    np.testing.assert_array_equal(np.asarray(model.whiten.kernel[...]), kernel)


def test_fit_to_data_rejects_wrong_images():
    with pytest.raises(ValueError, match="fit_to_data"):
        build().fit_to_data(np.zeros((2, 32, 32), np.uint8))
