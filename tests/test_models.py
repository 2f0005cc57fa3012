"""The architecture zoo: every model is registered with a documented config, has the reference parameter
count (counted abstractly with ``nnx.eval_shape``, nothing allocated), and runs a real forward pass in train
and eval mode on a tiny input; classifiers expose ``features`` / ``num_features`` / ``head``.

Reference parameter counts (``nnx.Param`` leaves; BatchNorm running statistics are buffers, not counted):
- torchvision: ``torchvision.models.<Name>_Weights.IMAGENET1K_V1.meta["num_params"]`` (the "Params" column of
  https://pytorch.org/vision/stable/models.html), 1000 classes, 3 channels.
- timm: ``sum(p.numel() for p in timm.create_model("vit_*_patch16_224").parameters())`` (1000 classes, 224 px).
- YOLOv3: ultralytics/yolov3 ``yolov3.yaml`` model summary "61,949,149 parameters" (80 classes), the same
  network as darknet's ``yolov3.cfg`` (BN scale+bias counted, no conv bias before BN, biased 1x1 outputs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.model_summary import count_params, model_summary
from prism.framework.registry import MODELS
from prism.plugins.models._layers import adaptive_avg_pool
from prism.plugins.models.mobilenet import SETTINGS, MobileNetV2Config, make_divisible
from prism.plugins.models.unet import output_size
from prism.plugins.models.yolov3 import prior_bias

IMAGENET = DataInfo(num_classes=1000, image_shape=(224, 224, 3))

REFERENCE_PARAMS = {
    # torchvision weights meta["num_params"]
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "vgg11": 132_863_336,
    "vgg11_bn": 132_868_840,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "densenet121": 7_978_856,
    "mobilenet_v2": 3_504_872,
    "alexnet": 61_100_840,
    # timm vit_{base,small,tiny}_patch16_224
    "vit_b16": 86_567_656,
    "vit_s16": 22_050_664,
    "vit_ti16": 5_717_416,
}

ZOO = [*REFERENCE_PARAMS, "unet", "yolov3"]


def abstract(name: str, data: DataInfo = IMAGENET, cfg=None) -> nnx.Module:
    """The model with shapes only (no parameter memory, no RNG work)."""
    return nnx.eval_shape(lambda: MODELS.build(name, cfg, data=data, rngs=nnx.Rngs(0)))


def output_shapes(model: nnx.Module, *input_shapes):
    """Shapes (``jax.ShapeDtypeStruct``) of ``model(*inputs)`` for abstract or concrete models, nothing computed."""
    graphdef, state = nnx.split(model)
    inputs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in input_shapes]
    return jax.eval_shape(lambda state, *xs: nnx.merge(graphdef, state)(*xs), state, *inputs)


def config(name: str, **overrides):
    return dataclasses.replace(MODELS.get(name).default_config(), **overrides)


# -- registration ---------------------------------------------------------------------------------------
def test_every_model_is_registered_with_a_description_and_a_documented_config():
    for name in ZOO:
        entry = MODELS.get(name)
        assert entry.description, name
        assert entry.module.startswith("prism.plugins.models."), name
        assert dataclasses.is_dataclass(entry.config), name
        assert len(entry.metadata["default_image_shape"]) == 3, name
        fields = {f.name for f in dataclasses.fields(entry.config)}
        assert "num_classes" in fields, name
        docs = "".join(cls.__doc__ or "" for cls in entry.config.__mro__)
        undocumented = [f for f in fields if f"{f}:" not in docs]
        assert not undocumented, f"{name}: config fields without documentation: {undocumented}"


def test_configs_compose_through_hydra():
    from prism.framework.config import compose
    from prism.framework.optim import plugin_config

    cfg = compose(["model=resnet18", "model.stem=cifar", "model.width=16"])
    model_cfg = plugin_config(cfg.model)
    assert type(model_cfg).__name__.startswith("ResNet18Config")
    assert (model_cfg.depth, model_cfg.stem, model_cfg.width) == (18, "cifar", 16)
    assert plugin_config(compose(["model=densenet121", "model.block_config=[1,2]"]).model).block_config == [1, 2]
    cfg = compose(["model=vit_s16", "model.patch_size=8"])
    assert (cfg.model.name, cfg.model.embed_dim, cfg.model.patch_size) == ("vit_s16", 384, 8)
    for name in ("yolov3", "unet", "vgg16_bn", "mobilenet_v2", "alexnet"):
        assert compose([f"model={name}"]).model.name == name


# -- parameter counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_parameter_count_matches_reference(name):
    assert count_params(abstract(name)) == REFERENCE_PARAMS[name]


def _conv(k: int, cin: int, cout: int, bias: bool = True) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def test_unet_parameter_count_matches_the_2015_layout():
    # Ronneberger et al. 2015, Fig. 1: 1 input channel, 2 classes, unpadded 3x3 convs with bias, no BN.
    expected, cin = 0, 1
    for w in (64, 128, 256, 512):  # contracting path
        expected += _conv(3, cin, w) + _conv(3, w, w)
        cin = w
    expected += _conv(3, 512, 1024) + _conv(3, 1024, 1024)  # bottom
    for w in (512, 256, 128, 64):  # expanding path: up-conv 2x2 halving channels, then two 3x3 on the concat
        expected += _conv(2, 2 * w, w) + _conv(3, 2 * w, w) + _conv(3, w, w)
    expected += _conv(1, 64, 2)
    assert expected == 31_030_658
    model = abstract("unet", DataInfo(num_classes=2, image_shape=(572, 572, 1)))
    assert count_params(model) == expected


def test_yolov3_parameter_count_matches_darknet_and_ultralytics():
    coco = DataInfo(num_classes=80, image_shape=(416, 416, 3))
    model = abstract("yolov3", coco)
    assert count_params(model) == 61_949_149

    def conv_bn(k, cin, cout):  # darknet [convolutional] batch_normalize=1: no conv bias, BN scale + shift
        return _conv(k, cin, cout, bias=False) + 2 * cout

    backbone, cin = conv_bn(3, 3, 32), 32
    for stage, blocks in enumerate((1, 2, 8, 8, 4)):
        c = 64 * 2**stage
        backbone += conv_bn(3, cin, c) + blocks * (conv_bn(1, c, c // 2) + conv_bn(3, c // 2, c))
        cin = c
    assert count_params(model.backbone) == backbone == 40_584_928  # Darknet-53 without its classifier (~40.6M)


def test_mobilenet_width_mult_count_follows_the_rounded_layout():
    def by_hand(width_mult: float, classes: int = 1000) -> int:
        def conv_bn(k, cin, cout, groups=1):
            return k * k * (cin // groups) * cout + 2 * cout

        c = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        total = conv_bn(3, 3, c)
        for t, ch, n, _ in SETTINGS:
            out = make_divisible(ch * width_mult)
            for _ in range(n):
                hidden = c * t
                total += (conv_bn(1, c, hidden) if t != 1 else 0) + conv_bn(3, hidden, hidden, hidden)
                total += conv_bn(1, hidden, out)
                c = out
        return total + conv_bn(1, c, last) + last * classes + classes

    assert by_hand(1.0) == REFERENCE_PARAMS["mobilenet_v2"]
    half = count_params(abstract("mobilenet_v2", cfg=MobileNetV2Config(width_mult=0.5)))
    assert half == by_hand(0.5) == 1_968_680  # torchvision mobilenet_v2(width_mult=0.5)
    # torchvision's _make_divisible: nearest multiple of 8, never below 8 nor 10% below the value
    values = (16.0, 12.0, 8.0, 4.0, 80.0, 1280.0, 59.2, 10.0)
    assert [make_divisible(v) for v in values] == [16, 16, 8, 8, 80, 1280, 56, 16]


def test_num_classes_and_channels_come_from_the_dataset_unless_configured():
    gray10 = DataInfo(num_classes=10, image_shape=(32, 32, 1))
    model = abstract("resnet18", gray10)
    assert model.conv1.kernel.shape == (7, 7, 1, 64) and model.head.kernel.shape == (512, 10)
    model = abstract("resnet18", gray10, cfg=config("resnet18", num_classes=7))
    assert model.head.kernel.shape == (512, 7)


# -- forward passes -------------------------------------------------------------------------------------
SMALL = {  # name -> (config overrides, input shape): real parameters and a real forward pass, cheap on CPU
    "resnet18": (dict(stem="cifar"), (2, 32, 32, 3)),
    "resnet50": (dict(width=8), (2, 32, 32, 3)),
    "alexnet": (dict(hidden=32), (2, 64, 64, 3)),  # 64 px: a 1x1 map before the adaptive pool
    "vgg11_bn": (dict(hidden=32), (2, 32, 32, 3)),
    "densenet121": (dict(growth_rate=8, block_config=[2, 3], num_init_features=16), (2, 32, 32, 3)),
    "mobilenet_v2": (dict(width_mult=0.25), (2, 32, 32, 3)),
    "vit_s16": (dict(image_size=32, patch_size=8, depth=2, embed_dim=48, dropout=0.1, drop_path=0.2),
                (2, 32, 32, 3)),
}


def _real(name: str, shape, classes: int = 10, **overrides) -> nnx.Module:
    """The model with concrete parameters drawn on the host (NumPy): kernels ~ N(0, 1/fan_in), norm scales 1,
    biases 0. A jitted real initialisation is checked once (``test_real_initialisation_...``, ResNet); for every
    model it would cost minutes here: XLA compiles threefry random-number kernels slowly (measured on this
    2-core machine: 10 parameter tensors 27 s with jax_threefry_partitionable on, 3.7 s with it off)."""
    data = DataInfo(num_classes=classes, image_shape=shape[1:])
    model = abstract(name, data, config(name, **overrides))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        last = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]  # variable name
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
        if last in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if last in ("bias", "mean", "count") or leaf.ndim < 2:
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _train_then_eval(m: nnx.Module, x: jax.Array):
    """Outputs in train mode, then in eval mode (one compiled program under :func:`_apply`)."""
    m.train()
    train_out = m(x)
    m.eval()
    return train_out, m(x)


def _apply(model: nnx.Module, fn, *args):
    """``fn(model, *args)`` under one ``jax.jit`` (as the trainer runs models); state updates (BatchNorm
    statistics, RNG counters) are written back into ``model``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, *args):
        m = nnx.merge(graphdef, state)
        out = fn(m, *args)
        return out, nnx.state(m)

    out, new_state = run(state, *args)
    nnx.update(model, new_state)
    return out


@pytest.mark.parametrize("name", list(SMALL))
def test_classifier_forward_in_train_and_eval_mode(name):
    overrides, shape = SMALL[name]
    model = _real(name, shape, **overrides)
    x = jax.random.normal(jax.random.key(1), shape)

    def both_modes(m, x):  # one compiled program: train-mode logits, then eval-mode outputs
        m.train()
        train_logits = m(x)
        m.eval()
        feats = m.features(x)
        return train_logits, m(x), m(x), feats, m.head(feats)

    train_logits, out, again, feats, from_feats = _apply(model, both_modes, x)
    assert train_logits.shape == out.shape == (shape[0], 10)
    assert bool(jnp.isfinite(train_logits).all()) and bool(jnp.isfinite(out).all())
    assert feats.shape == (shape[0], model.num_features)
    np.testing.assert_array_equal(out, again)  # eval mode is deterministic
    np.testing.assert_allclose(out, from_feats, rtol=1e-5, atol=1e-5)  # __call__ = head(features(x))
    assert float(jnp.std(out)) > 1e-3  # not a degenerate (constant) output
    if name == "vit_s16":  # dropout / stochastic depth are active in train mode only
        assert not np.allclose(train_logits, out)


def test_real_initialisation_and_a_jitted_training_step_update_batchnorm_statistics():
    data = DataInfo(num_classes=10, image_shape=(16, 16, 3))
    cfg = config("resnet18", stem="cifar", width=4, zero_init_residual=True)
    # unsafe_rbg keys: the same initialisers, a random-bit generator that XLA:CPU compiles quickly
    build = lambda: MODELS.build("resnet18", cfg, data=data, rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(build()))())
    block = model.stages[1][0]
    assert float(jnp.abs(block.bn2.scale[...]).max()) == 0.0  # zero-init residual gamma
    assert float(jnp.abs(block.bn1.scale[...] - 1).max()) == 0.0
    assert block.downsample is not None and block.conv1.bias is None  # convs before BN have no bias
    kernel = np.asarray(model.stages[2][1].conv1.kernel[...])  # kaiming_normal(fan_out): std sqrt(2 / (9 * 16))
    assert kernel.std() == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.15)

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(2), (4, 16, 16, 3))
    labels = jnp.arange(4) % 10

    @jax.jit
    def step(params, rest):
        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            logp = jax.nn.log_softmax(m(x))
            return -jnp.take_along_axis(logp, labels[:, None], 1).mean(), nnx.split(m, nnx.Param, ...)[2]

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, new_rest

    loss, grads, new_rest = step(params, rest)
    assert bool(jnp.isfinite(loss))
    assert float(optax_norm(grads)) > 0
    before = np.asarray(model.bn1.mean[...])
    nnx.update(model, new_rest)
    assert not np.allclose(model.bn1.mean[...], before)  # running mean moved towards the batch mean


def optax_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(tree)))


def test_vit_resizes_position_embedding_for_other_input_sizes():
    model = _real("vit_ti16", (1, 32, 32, 3), image_size=32, patch_size=8, depth=1)
    assert model.pos_embed.shape == (1, 17, 192)
    model.eval()
    out = _apply(model, lambda m, x: m(x), jnp.ones((1, 48, 40, 3)))
    assert out.shape == (1, 10) and bool(jnp.isfinite(out).all())  # 6x5 grid from the 4x4 embedding
    with pytest.raises(ConfigError, match="multiple of model.patch_size"):
        _real("vit_ti16", (1, 30, 30, 3), patch_size=8)


def test_vit_drop_path_drops_whole_samples_in_train_mode_only():
    model = abstract("vit_ti16", DataInfo(10, (16, 16, 3)), cfg=config("vit_ti16", patch_size=8, depth=3,
                                                                        drop_path=0.5))
    assert [b.drop_path.rate for b in model.blocks] == [0.0, 0.25, 0.5]  # linear in depth, as timm
    drop = nnx.Dropout(0.5, broadcast_dims=(1, 2), rngs=nnx.Rngs(0))  # the blocks' stochastic depth
    x = jnp.ones((64, 5, 6))
    per_sample = np.unique(np.asarray(drop(x)).reshape(64, -1), axis=1)
    assert per_sample.shape[1] == 1  # one keep/drop decision per sample
    assert set(per_sample[:, 0]) == {0.0, 2.0}  # dropped samples are 0, kept ones scaled by 1 / (1 - rate)
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)


def test_unet_same_padding_keeps_the_input_size():
    model = _real("unet", (1, 64, 64, 1), classes=2, padding="same", width=4)
    x = jax.random.normal(jax.random.key(3), (1, 64, 64, 1))
    train_out, out = _apply(model, _train_then_eval, x)
    assert train_out.shape == out.shape == (1, 64, 64, 2) and bool(jnp.isfinite(out).all())
    odd = output_shapes(model, (1, 36, 44, 1))
    assert odd.shape == (1, 36, 44, 2)  # sizes floored by pooling are padded back


def test_unet_valid_padding_gives_the_papers_output_size():
    model = abstract("unet", DataInfo(num_classes=2, image_shape=(572, 572, 1)))
    model.eval()
    out = output_shapes(model, (1, 572, 572, 1))
    assert out.shape == (1, 388, 388, 2) and output_size(572) == 388
    with pytest.raises(ConfigError, match="odd size"):
        output_size(570)


def test_unet_valid_padding_forward_with_batchnorm():
    model = _real("unet", (1, 188, 188, 1), classes=3, padding="valid", width=2, batch_norm=True)
    assert model.down[0].conv1.bias is None  # convs followed by BN have no bias
    x = jax.random.normal(jax.random.key(4), (1, 188, 188, 1))
    train_out, out = _apply(model, _train_then_eval, x)
    assert train_out.shape == out.shape == (1, output_size(188), output_size(188), 3) == (1, 4, 4, 3)
    assert bool(jnp.isfinite(train_out).all()) and bool(jnp.isfinite(out).all())


def test_yolov3_output_shapes_at_416():
    model = abstract("yolov3", DataInfo(num_classes=80, image_shape=(416, 416, 3)))
    model.eval()
    outs = output_shapes(model, (2, 416, 416, 3))
    assert [o.shape for o in outs] == [(2, 13, 13, 3, 85), (2, 26, 26, 3, 85), (2, 52, 52, 3, 85)]
    assert model.strides == (32, 16, 8) and len(model.anchors) == 9


def test_yolov3_forward_in_train_and_eval_mode():
    model = _real("yolov3", (1, 64, 64, 3), classes=4, width=4, blocks=[1, 1, 1, 1, 1])
    x = jax.random.normal(jax.random.key(5), (1, 64, 64, 3))
    for outs in _apply(model, _train_then_eval, x):
        assert [o.shape for o in outs] == [(1, 2, 2, 3, 9), (1, 4, 4, 3, 9), (1, 8, 8, 3, 9)]
        assert all(bool(jnp.isfinite(o).all()) for o in outs)
    bias = prior_bias(4, 8)  # the prediction convs' initial bias: ultralytics' objectness/class priors
    assert bias.shape == (3, 9) and not bias[:, :4].any()
    np.testing.assert_allclose(bias[:, 4], math.log(8 / (640 / 8) ** 2), rtol=1e-6)
    np.testing.assert_allclose(bias[:, 5:], math.log(0.6 / (4 - 0.99)), rtol=1e-6)


# -- building blocks and the summary --------------------------------------------------------------------
def _torch_adaptive_avg_pool(x: np.ndarray, out: int) -> np.ndarray:
    """PyTorch's definition, loop by loop: bin i spans [floor(i*n/out), ceil((i+1)*n/out))."""
    b, h, w, c = x.shape
    y = np.zeros((b, out, out, c), x.dtype)
    for i in range(out):
        h0, h1 = math.floor(i * h / out), math.ceil((i + 1) * h / out)
        for j in range(out):
            w0, w1 = math.floor(j * w / out), math.ceil((j + 1) * w / out)
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("size,out", [(13, 6), (7, 7), (14, 7), (1, 6), (5, 7), (10, 3)])
def test_adaptive_avg_pool_matches_pytorch_bins(size, out):
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(adaptive_avg_pool(jnp.asarray(x), out), _torch_adaptive_avg_pool(x, out),
                               rtol=1e-5, atol=1e-6)


def test_model_summary_resnet18():
    summary = model_summary("resnet18")
    assert summary["params"] == REFERENCE_PARAMS["resnet18"]
    # torchvision: 1.81 GMACs = 3.63 GFLOPs at 224x224 (ResNet18_Weights meta "_ops"); XLA leaves out
    # taps on conv padding, so it reports ~3.37.
    assert summary["gflops"] == pytest.approx(3.63, rel=0.10)
    small = model_summary("resnet18", image_shape=(32, 32, 3), num_classes=10, cfg=config("resnet18", stem="cifar"))
    assert small["params"] == REFERENCE_PARAMS["resnet18"] - 512 * 990 - 990 - 7 * 7 * 3 * 64 + 3 * 3 * 3 * 64
    assert 0.5 < small["gflops"] < 1.2  # the CIFAR stem keeps 32x32 maps: ~0.56 GMACs


def test_unoptimized_cpu_init_equals_the_optimized_compile_up_to_rounding():
    """prism.framework.train.RUN_ONCE (init programs compiled without LLVM optimization on CPU) changes the initial
    weights by rounding only: the same draws, no FMA contraction."""
    from prism.framework.train import RUN_ONCE

    def init():
        cfg = dataclasses.replace(MODELS.get("simple_cnn").default_config(), widths=[8, 16])
        model = MODELS.build("simple_cnn", cfg, data=DataInfo(num_classes=10, image_shape=(8, 8, 1)),
                             rngs=nnx.Rngs(0))
        return nnx.state(model, nnx.Param)

    fast_compile, optimized = jax.jit(init, compiler_options=RUN_ONCE)(), jax.jit(init)()
    pairs = list(zip(jax.tree.leaves(fast_compile), jax.tree.leaves(optimized), strict=True))
    assert len(pairs) >= 6
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(np.std(np.asarray(a)) > 0 for a, _ in pairs)  # real random draws, not constants
