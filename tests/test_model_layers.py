"""A strided conv computed as a space-to-depth stride-1 conv is the same function as ``nnx.Conv`` itself
(values and kernel gradient), and every model with a ``stem_conv`` option gives the same logits either way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.plugins.models._layers import conv, space_to_depth_conv


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


@pytest.mark.parametrize("name,cfg,size", [("resnet18", dict(width=8), 40), ("densenet121", dict(growth_rate=4,
                          block_config=[1, 1], num_init_features=8), 40), ("alexnet", dict(hidden=16), 67),
                          ("mobilenet_v2", dict(width_mult=0.25), 33)])
def test_stem_convs_compute_the_same_function(name, cfg, size):
    """A model's stem_conv option changes how its strided first conv is computed, not what: same parameters
    (the direct model's weights load into the other), same logits."""
    data = DataInfo(10, (size, size, 3))
    x = jax.random.normal(jax.random.key(2), (2, size, size, 3))
    models = {}
    for stem_conv in ("direct", "space_to_depth"):
        config = MODELS.get(name).default_config()
        for key, value in {**cfg, "stem_conv": stem_conv}.items():
            setattr(config, key, value)
        models[stem_conv] = MODELS.build(name, config, data=data, rngs=nnx.Rngs(0))
        models[stem_conv].eval()
    nnx.update(models["space_to_depth"], nnx.state(models["direct"]))
    np.testing.assert_allclose(np.asarray(models["space_to_depth"](x)), np.asarray(models["direct"](x)), rtol=1e-4,
                               atol=1e-4)
    config = MODELS.get(name).default_config()
    config.stem_conv = "winograd"
    with pytest.raises(ConfigError, match="model.stem_conv must be one of"):
        MODELS.build(name, config, data=data, rngs=nnx.Rngs(0))
