"""prism.framework.layers.BatchNorm: equal to nnx.BatchNorm with one statistics group, to a NumPy per-group batch
norm with several, and free of cross-device reductions when each group is one device's shard."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prism.framework import parallel
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm

EPS, MOMENTUM = 1e-5, 0.9


def _layers(channels: int = 3) -> tuple[BatchNorm, nnx.BatchNorm]:
    ours = BatchNorm(channels, momentum=MOMENTUM, epsilon=EPS, rngs=nnx.Rngs(0))
    plain = nnx.BatchNorm(channels, momentum=MOMENTUM, epsilon=EPS, rngs=nnx.Rngs(0))
    for layer in (ours, plain):  # non-trivial affine parameters
        layer.scale[...] = jnp.array([0.5, 2.0, -1.0])
        layer.bias[...] = jnp.array([0.1, -0.2, 0.3])
    return ours, plain


def _input(shape=(8, 5, 4, 3)) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[-1]) + rng.normal(size=shape[-1])).astype(
        np.float32)


def _pure(layer: nnx.Module):
    """The layer as a function of its input (a fresh copy per call: traceable by jax.grad/jit)."""
    graphdef, state = nnx.split(layer)
    return lambda v: nnx.merge(graphdef, state, copy=True)(v)


def test_one_group_is_flax_batch_norm():
    ours, plain = _layers()
    x = jnp.asarray(_input())
    np.testing.assert_array_equal(ours(x), plain(x))
    np.testing.assert_array_equal(ours.mean[...], plain.mean[...])
    np.testing.assert_array_equal(ours.var[...], plain.var[...])
    ours.eval(), plain.eval()
    np.testing.assert_array_equal(ours(x), plain(x))


@pytest.mark.parametrize("groups", [2, 4])
def test_groups_normalize_each_contiguous_chunk_with_its_own_statistics(groups):
    ours, _ = _layers()
    ours.stat_groups = groups
    x = _input()
    y = np.asarray(ours(jnp.asarray(x)))
    scale, bias = np.array([0.5, 2.0, -1.0]), np.array([0.1, -0.2, 0.3])
    chunks = np.split(x.astype(np.float64), groups)
    expected = np.concatenate([(c - c.mean((0, 1, 2))) / np.sqrt(c.var((0, 1, 2)) + EPS) * scale + bias
                               for c in chunks])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    # running statistics: momentum update towards the mean over the groups of their (biased) statistics
    np.testing.assert_allclose(ours.mean[...], (1 - MOMENTUM) * np.mean([c.mean((0, 1, 2)) for c in chunks], 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.var[...], MOMENTUM + (1 - MOMENTUM) * np.mean([c.var((0, 1, 2)) for c in chunks],
                                                                                  0), rtol=1e-5)
    # gradients flow through the per-group statistics as through a batch norm of each chunk alone
    weights = jnp.asarray(_input()[..., ::-1].copy())
    grad = jax.grad(lambda v: jnp.sum(_pure(ours)(v) * weights))(jnp.asarray(x))
    single = _pure(_layers()[0])
    chunk_grads = [jax.grad(lambda v, w=w: jnp.sum(single(v) * w))(jnp.asarray(c.astype(np.float32)))
                   for c, w in zip(np.split(x, groups), np.split(np.asarray(weights), groups), strict=True)]
    np.testing.assert_allclose(grad, np.concatenate(chunk_grads), rtol=1e-4, atol=1e-5)


def test_bad_group_count_names_it():
    ours, _ = _layers()
    ours.stat_groups = 3
    with pytest.raises(ValueError, match="stat_groups=3 does not divide the batch of 8"):
        ours(jnp.asarray(_input()))


def _all_reduces(groups: int) -> tuple[int, np.ndarray]:
    """All-reduce ops in the compiled forward + input gradient of a BatchNorm whose batch is sharded over the
    4 simulated devices (the running-statistics update is not returned, so it is not part of the program)."""
    ours, _ = _layers()
    ours.stat_groups = groups
    apply = _pure(ours)
    mesh = parallel.make_mesh()
    x = jax.device_put(jnp.asarray(_input()), NamedSharding(mesh, P(parallel.DATA_AXES)))

    def forward_and_grad(v):
        y, pullback = jax.vjp(apply, v)
        return y, pullback(jnp.ones_like(y))[0]

    step = jax.jit(forward_and_grad)
    hlo = step.lower(x).compile().as_text()
    return hlo.count(" all-reduce("), np.asarray(step(x)[0])


def test_one_group_per_device_keeps_the_reductions_on_the_device():
    assert len(jax.devices()) == 4
    global_count, global_y = _all_reduces(1)
    local_count, local_y = _all_reduces(4)
    assert global_count >= 1  # SyncBN: the statistics of the sharded batch need a cross-device reduction
    assert local_count == 0
    ours, _ = _layers()
    ours.stat_groups = 4
    np.testing.assert_allclose(local_y, ours(jnp.asarray(_input())), rtol=1e-5, atol=1e-6)


def test_set_batch_stats_reaches_every_prism_batch_norm_and_reports_plain_ones(caplog):
    class Net(nnx.Module):
        def __init__(self):
            self.a = BatchNorm(3, rngs=nnx.Rngs(0))
            self.b = nnx.List([BatchNorm(3, rngs=nnx.Rngs(0))])
            self.c = nnx.BatchNorm(3, rngs=nnx.Rngs(0))

    net, mesh = Net(), parallel.make_mesh()
    with caplog.at_level(logging.WARNING, logger="prism"):
        assert parallel.set_batch_stats(net, "per_device", mesh) == ["c"]
    assert net.a.stat_groups == net.b[0].stat_groups == 4
    assert "1 BatchNorm layer(s) are plain nnx.BatchNorm and keep global statistics" in caplog.text
    assert caplog.text.rstrip().endswith(": c")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="prism"):
        parallel.set_batch_stats(net, "global", mesh)
    assert net.a.stat_groups == net.b[0].stat_groups == 1
    assert not caplog.text  # global statistics: nothing to warn about
    with pytest.raises(ConfigError, match="parallel.batch_stats must be one of global, per_device, got 'local'"):
        parallel.set_batch_stats(net, "local", mesh)
