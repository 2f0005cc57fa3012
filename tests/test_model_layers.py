"""The alternative computations of shared model layers compute the same function as the plain ones:
max-pool as a maximum of strided slices (against XLA's ``reduce_window`` and a NumPy max-pool), a strided
conv as a space-to-depth stride-1 conv (against ``nnx.Conv`` itself), and a ResNet with either stem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from framework.api import DataInfo
from framework.registry import MODELS
from plugins.models._layers import conv, max_pool, space_to_depth_conv


def _numpy_max_pool(x: np.ndarray, kernel: int, stride: int, padding: int) -> np.ndarray:
    """PyTorch MaxPool2d semantics on NHWC, written out with loops."""
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    n, h, w, c = x.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out = np.empty((n, oh, ow, c), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = x[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel].max(axis=(1, 2))
    return out


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 2, 1, (9, 8)), (2, 2, 0, (8, 7)), (3, 2, 0, (11, 11)),
                                                        (3, 1, 1, (5, 6))])
def test_max_pool_slices_equal_window_and_numpy(kernel, stride, padding, size):
    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)  # continuous: no ties
    slices = max_pool(jnp.asarray(x), kernel, stride, padding, impl="slices")
    window = max_pool(jnp.asarray(x), kernel, stride, padding, impl="window")
    np.testing.assert_array_equal(np.asarray(slices), np.asarray(window))
    np.testing.assert_array_equal(np.asarray(slices), _numpy_max_pool(x, kernel, stride, padding))

    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=slices.shape).astype(np.float32))
    grads = [jax.grad(lambda v, impl=impl: (max_pool(v, kernel, stride, padding, impl=impl) * cotangent).sum())(
        jnp.asarray(x)) for impl in ("slices", "window")]
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=1e-6, atol=1e-6)
    assert np.count_nonzero(np.asarray(grads[0])) > 0


def test_max_pool_slices_bf16_and_bad_impl():
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 4), jnp.bfloat16)
    slices = max_pool(x, 3, 2, 1)
    assert slices.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(slices, np.float32), np.asarray(max_pool(x, 3, 2, 1, impl="window"),
                                                                               np.float32))
    with pytest.raises(ValueError, match="impl must be one of"):
        max_pool(x, 3, 2, 1, impl="scatter")


@pytest.mark.parametrize("kernel,stride,padding,size,bias", [(7, 2, 3, (32, 32), False), (7, 2, 3, (31, 29), False),
                                                             (3, 2, 1, (9, 10), True), (4, 2, 1, (12, 12), False),
                                                             (5, 3, 0, (16, 14), True)])
def test_space_to_depth_conv_equals_the_conv(kernel, stride, padding, size, bias):
    layer = conv(3, 8, kernel, stride=stride, padding=padding, bias=bias, rngs=nnx.Rngs(0),
                 bias_init=nnx.initializers.normal(1.0))
    x = jax.random.normal(jax.random.key(1), (2, *size, 3))
    direct, s2d = layer(x), space_to_depth_conv(layer, x)
    assert s2d.shape == direct.shape
    np.testing.assert_allclose(np.asarray(s2d), np.asarray(direct), rtol=1e-5, atol=1e-5)

    def kernel_grad(fn):
        return np.asarray(nnx.grad(lambda m: (fn(m, x) ** 2).sum())(layer).kernel[...])

    np.testing.assert_allclose(kernel_grad(space_to_depth_conv), kernel_grad(lambda m, v: m(v)), rtol=1e-4,
                               atol=1e-4)


def test_space_to_depth_conv_refuses_what_it_cannot_compute():
    grouped = nnx.Conv(4, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="without groups"):
        space_to_depth_conv(grouped, jnp.zeros((1, 8, 8, 4)))
    same = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="explicit padding"):
        space_to_depth_conv(same, jnp.zeros((1, 8, 8, 3)))


def test_resnet_stems_compute_the_same_function():
    """A ResNet's stem options change how the stem is computed, not what: same parameters, same logits."""
    data = DataInfo(10, (40, 40, 3))
    x = jax.random.normal(jax.random.key(2), (2, 40, 40, 3))
    logits = {}
    for stem_conv, stem_pool in (("direct", "window"), ("space_to_depth", "slices")):
        cfg = MODELS.get("resnet18").default_config()
        cfg.width, cfg.stem_conv, cfg.stem_pool = 8, stem_conv, stem_pool
        model = MODELS.build("resnet18", cfg, data=data, rngs=nnx.Rngs(0))
        model.eval()
        logits[stem_conv] = np.asarray(model(x))
    np.testing.assert_allclose(logits["space_to_depth"], logits["direct"], rtol=1e-4, atol=1e-4)
    cfg = MODELS.get("resnet18").default_config()
    cfg.stem_conv = "winograd"
    with pytest.raises(ValueError, match="stem_conv must be one of"):
        MODELS.build("resnet18", cfg, data=data, rngs=nnx.Rngs(0))
