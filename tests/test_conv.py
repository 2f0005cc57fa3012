"""prism.framework.conv: the matmul weight-gradient convolution equals lax.conv_general_dilated (forward, input
and weight gradients), is chosen as documented, and trains a real model to the same loss and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prism.framework import conv
from prism.framework.errors import ConfigError

DN = ("NHWC", "HWIO", "NHWC")

# (batch, size, in, out, kernel, stride, padding, dilation, groups)
CASES = [
    (3, 9, 4, 6, 3, 1, "SAME", 1, 1),
    (2, 10, 4, 6, 3, 2, ((1, 1), (1, 1)), 1, 1),  # torchvision stride-2 3x3
    (2, 11, 6, 4, 1, 2, "VALID", 1, 1),  # 1x1 strided shortcut
    (2, 12, 3, 8, 7, 2, ((3, 3), (3, 3)), 1, 1),  # ImageNet stem
    (2, 9, 4, 4, 3, 1, ((2, 0), (1, 2)), 2, 1),  # asymmetric padding, dilation
    (2, 8, 6, 4, 2, 2, "VALID", 1, 1),  # ViT-style patch embedding
    (2, 7, 5, 3, 3, 2, "SAME", 1, 1),  # odd size, flax's asymmetric SAME
    (2, 8, 4, 8, 3, 1, "SAME", 1, 2),  # grouped
    (2, 8, 4, 8, 3, 2, ((1, 1), (1, 1)), 1, 4),  # depthwise, channel multiplier 2
]


def _loss(conv_fn, stride, padding, dilation, groups):
    def loss(x, w):
        y = conv_fn(x, w, (stride, stride), padding, rhs_dilation=(dilation, dilation), dimension_numbers=DN,
                    feature_group_count=groups)
        return jnp.sum(jnp.sin(y)), y  # a non-linear loss, so the output gradient varies per element

    return loss


def _rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


# Every case with the whole batch in one chunk; a few also with one image per chunk (the loop path).
PARAMS = [pytest.param(c, conv.CHUNK_BYTES, id=f"{i}-whole-batch") for i, c in enumerate(CASES)]
PARAMS += [pytest.param(CASES[i], 1, id=f"{i}-one-image-chunks") for i in (1, 4, 8)]


@pytest.mark.parametrize(("case", "chunk_bytes"), PARAMS)
def test_matches_lax_conv(case, chunk_bytes, monkeypatch):
    n, size, cin, cout, k, stride, padding, dilation, groups = case
    monkeypatch.setattr(conv, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
    ref = jax.grad(_loss(lax.conv_general_dilated, stride, padding, dilation, groups), (0, 1), has_aux=True)
    with conv.forced("matmul"):
        got = jax.jit(jax.grad(_loss(conv.conv_general_dilated, stride, padding, dilation, groups), (0, 1),
                               has_aux=True))
        (dx, dw), y = got(x, w)
    (rdx, rdw), ry = ref(x, w)
    assert y.shape == ry.shape
    assert _rel(ry, y) < 1e-5
    assert _rel(rdx, dx) < 1e-5
    assert _rel(rdw, dw) < 1e-5


def test_weight_grad_chunks_pad_a_batch_that_does_not_divide():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(5, 6, 6, 3)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(5, 6, 6, 4)), jnp.float32)
    pads = ((1, 1), (1, 1))
    whole = conv.weight_grad(x, g, (3, 3, 3, 4), (1, 1), pads, (1, 1))
    per_image = 6 * 6 * 9 * 3 * 4
    old = conv.CHUNK_BYTES
    try:
        conv.CHUNK_BYTES = 2 * per_image  # chunks of 2 images: 3 steps, one zero image added
        chunked = conv.weight_grad(x, g, (3, 3, 3, 4), (1, 1), pads, (1, 1))
    finally:
        conv.CHUNK_BYTES = old
    _, vjp = jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN),
                     jnp.zeros((3, 3, 3, 4)))
    (ref,) = vjp(g)
    assert _rel(ref, whole) < 1e-5 and _rel(ref, chunked) < 1e-5


def test_sharded_batch_gives_the_same_gradient():
    """Batch sharded over the test's 4 simulated devices, weight gradient chunked: same as unsharded."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    loss = _loss(conv.conv_general_dilated, 1, "SAME", 1, 1)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    old = conv.CHUNK_BYTES
    try:
        conv.CHUNK_BYTES = 1
        with conv.forced("matmul"):
            (_, dw), _ = jax.jit(jax.grad(loss, (0, 1), has_aux=True))(xs, w)
    finally:
        conv.CHUNK_BYTES = old
    (_, rdw), _ = jax.grad(_loss(lax.conv_general_dilated, 1, "SAME", 1, 1), (0, 1), has_aux=True)(x, w)
    assert _rel(rdw, dw) < 1e-5


def _uses_custom_vjp(groups: int = 1, batch: int = 32, **kw) -> bool:
    """Whether a 32x32, 64-channel 3x3 conv (~2.4 GFLOPs at batch 32) takes the matmul path."""
    x = jax.ShapeDtypeStruct((batch, 32, 32, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 64 // groups, 64), jnp.float32)
    kw = {"padding": "SAME", **kw}
    jaxpr = jax.make_jaxpr(lambda x, w: conv.conv_general_dilated(x, w, (1, 1), dimension_numbers=DN,
                                                                  feature_group_count=groups, **kw))(x, w)
    return "custom_vjp" in str(jaxpr)


def test_path_selection(monkeypatch):
    monkeypatch.delenv(conv.ENV, raising=False)
    assert conv.mode() == "auto"
    assert jax.default_backend() == "cpu"
    assert _uses_custom_vjp()  # auto on CPU: matmul weight gradient
    assert not _uses_custom_vjp(batch=1)  # ~75 MFLOPs: below conv.MIN_FLOPS, XLA's (faster to compile)
    assert not _uses_custom_vjp(groups=64)  # auto leaves grouped (here depthwise) convs to XLA
    assert not _uses_custom_vjp(lhs_dilation=(2, 2), padding=((1, 1), (1, 1)))  # transposed convs: XLA
    monkeypatch.setenv(conv.ENV, "xla")
    assert not _uses_custom_vjp()
    monkeypatch.setenv(conv.ENV, "matmul")
    assert _uses_custom_vjp(groups=64) and _uses_custom_vjp(batch=1)
    with conv.forced("xla"):
        assert not _uses_custom_vjp()
    monkeypatch.setenv(conv.ENV, "fast")
    with pytest.raises(ConfigError, match="PRISM_CONV='fast'.*auto, xla, matmul"):
        conv.mode()


class _TinyResNet(nnx.Module):
    """Stem conv + one strided ResNet BasicBlock (3x3 stride 2, 1x1 strided shortcut) + linear head, built
    from the model plugins' own layers."""

    def __init__(self, rngs: nnx.Rngs):
        from prism.plugins.models._layers import batch_norm, conv, linear
        from prism.plugins.models.resnet import BasicBlock

        self.conv = conv(3, 4, 3, rngs=rngs)
        self.bn = batch_norm(4, rngs=rngs)
        self.block = BasicBlock(4, 8, 2, zero_init=False, rngs=rngs)
        self.head = linear(8, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.block(nnx.relu(self.bn(self.conv(x)))).mean(axis=(1, 2)))


def test_tiny_resnet_train_step_same_on_both_paths():
    """One real train step (forward in training mode with BatchNorm, cross-entropy, gradients, SGD update)
    of a small residual network: same loss, gradients and updated parameters on both paths."""
    graphdef, params, rest = nnx.split(_TinyResNet(nnx.Rngs(0)), nnx.Param, ...)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 4), jnp.int32)
    tx = optax.sgd(0.1, momentum=0.9)

    def step(p, r):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, r, copy=True)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, _ = tx.update(grads, tx.init(p), p)
        return loss, grads, optax.apply_updates(p, updates)

    results = {}
    for mode in ("xla", "matmul"):
        with conv.forced(mode):
            results[mode] = jax.jit(step)(params, rest)
    (l_xla, g_xla, p_xla), (l_mm, g_mm, p_mm) = results["xla"], results["matmul"]
    assert jnp.isfinite(l_xla) and abs(float(l_xla) - float(l_mm)) < 1e-5 * abs(float(l_xla))
    leaves_xla, leaves_mm = jax.tree.leaves(g_xla), jax.tree.leaves(g_mm)
    assert len(leaves_xla) == len(leaves_mm) == 14  # 4 conv kernels, 4 BatchNorms (scale, bias), linear
    for a, b in zip(leaves_xla, leaves_mm, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))
    for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_mm), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
