"""ResNet-18/34/50/101/152 (He et al. 2016) in torchvision's layout (v1.5: the stride of a bottleneck is on its
3x3 conv), with an optional CIFAR stem (3x3 stride-1 conv, no max-pool)."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.taps import tap
from prism.plugins.models._layers import (
    STEM_CONVS,
    batch_norm,
    check_stem_conv,
    conv,
    linear,
    max_pool,
    num_classes_of,
)
from prism.plugins.models._torch_import import TorchRules

#: depth -> (block type, blocks per stage), as torchvision.models.resnet.
DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}
STEMS = ("imagenet", "cifar")


@dataclass
class ResNetConfig:
    """A residual network.

    depth: 18, 34 (BasicBlock) or 50, 101, 152 (Bottleneck, expansion 4).
    stem: "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max-pool, for ~224 px images) or "cifar"
        (3x3 stride-1 conv, no max-pool, for ~32 px images).
    width: output channels of the stem and base width of the first stage; stages use width * (1, 2, 4, 8)
        (64 in torchvision; smaller values give cheap test models).
    zero_init_residual: start the last BatchNorm gamma of every residual branch at 0, so each block starts
        as the identity (Goyal et al. 2017; torchvision's ``zero_init_residual``).
    num_classes: 0 means the dataset's number of classes.
    stem_conv: how the ImageNet stem's 7x7 stride-2 conv is computed: "space_to_depth" (a 4x4 stride-1 conv on
        2x2 blocks of pixels, :class:`~plugins.models._layers.SpaceToDepthConv`) or "direct". The same
        function of the same parameters; only the speed differs (the CIFAR stem is not strided: always direct).
    """

    depth: int = field(default=50, metadata={"choices": tuple(DEPTHS)})
    stem: str = field(default="imagenet", metadata={"choices": STEMS})
    width: int = field(default=64, metadata={"ge": 1})
    zero_init_residual: bool = False
    num_classes: int = field(default=0, metadata={"ge": 0})
    stem_conv: str = field(default="space_to_depth", metadata={"choices": STEM_CONVS})


class _Downsample(nnx.Module):
    """1x1 strided conv + BN on the shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, 1, stride=stride, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, zero_init: bool, rngs: nnx.Rngs):
        self.conv1 = conv(in_ch, planes, 3, stride=stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = batch_norm(planes, zero_init=zero_init, rngs=rngs)
        needs = stride != 1 or in_ch != planes
        self.downsample = _Downsample(in_ch, planes, stride, rngs=rngs) if needs else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand (x4), each with BN; + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, zero_init: bool, rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.conv1 = conv(in_ch, planes, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride=stride, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, out_ch, 1, rngs=rngs)
        self.bn3 = batch_norm(out_ch, zero_init=zero_init, rngs=rngs)
        needs = stride != 1 or in_ch != out_ch
        self.downsample = _Downsample(in_ch, out_ch, stride, rngs=rngs) if needs else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet(nnx.Module):
    """stem -> 4 stages of residual blocks -> global average pool (``features``) -> linear ``head``.

    Tapped feature maps (``tap_layers``, :mod:`prism.framework.taps`): ``stem`` and ``stage1``..``stage4``, each
    stage's output (the last one explained by default)."""

    def __init__(self, cfg: ResNetConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        if cfg.depth not in DEPTHS:
            raise ConfigError(f"model.depth must be one of {sorted(DEPTHS)} (ResNet), got {cfg.depth}")
        if cfg.stem not in STEMS:
            raise ConfigError(f"model.stem must be one of {STEMS} (ResNet), got {cfg.stem!r}")
        kind, blocks = DEPTHS[cfg.depth]
        space_to_depth = check_stem_conv(cfg.stem_conv, "ResNet")
        block = BasicBlock if kind == "basic" else Bottleneck
        self.imagenet_stem = cfg.stem == "imagenet"
        if self.imagenet_stem:
            self.conv1 = conv(in_channels, cfg.width, 7, stride=2, padding=3, rngs=rngs, space_to_depth=space_to_depth)
        else:
            self.conv1 = conv(in_channels, cfg.width, 3, stride=1, padding=1, rngs=rngs)
        self.bn1 = batch_norm(cfg.width, rngs=rngs)
        stages, channels = [], cfg.width
        for i, n in enumerate(blocks):
            planes = cfg.width * 2**i
            stage = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block(channels, planes, stride, zero_init=cfg.zero_init_residual, rngs=rngs))
                channels = planes * block.expansion
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.num_features = channels
        self.head = linear(channels, num_classes, rngs=rngs)
        self.tap_layers = ("stem", *(f"stage{i + 1}" for i in range(len(blocks))))

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled output of the last stage, shape (batch, num_features)."""
        x = nnx.relu(self.bn1(self.conv1(x)))
        if self.imagenet_stem:
            x = max_pool(x, 3, 2, padding=1)
        x = tap("stem", x)
        for i, stage in enumerate(self.stages):
            for blk in stage:
                x = blk(x)
            x = tap(f"stage{i + 1}", x)
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def torch_rules(model: ResNet) -> list:
    """torchvision ``resnet*`` state-dict names (``layer1.0.conv1``, ``downsample.0``/``.1``, ``fc``)."""
    rules = TorchRules(model).add("conv1", "conv1").add("bn1", "bn1")
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage):
            ours, theirs = f"stages.{i}.{j}", f"layer{i + 1}.{j}"
            for n in (1, 2, 3) if isinstance(blk, Bottleneck) else (1, 2):
                rules.add(f"{ours}.conv{n}", f"{theirs}.conv{n}").add(f"{ours}.bn{n}", f"{theirs}.bn{n}")
            if blk.downsample is not None:
                rules.add(f"{ours}.downsample.conv", f"{theirs}.downsample.0")
                rules.add(f"{ours}.downsample.bn", f"{theirs}.downsample.1")
    return rules.add("head", "fc").rules


def build_resnet(cfg: ResNetConfig, *, data: DataInfo, rngs: nnx.Rngs) -> ResNet:
    return ResNet(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)


@dataclass
class ResNet18Config(ResNetConfig):
    """ResNet-18: BasicBlock, (2, 2, 2, 2) blocks; fields as :class:`ResNetConfig`."""

    depth: int = field(default=18, metadata={"choices": tuple(DEPTHS)})


@dataclass
class ResNet34Config(ResNetConfig):
    """ResNet-34: BasicBlock, (3, 4, 6, 3) blocks; fields as :class:`ResNetConfig`."""

    depth: int = field(default=34, metadata={"choices": tuple(DEPTHS)})


@dataclass
class ResNet50Config(ResNetConfig):
    """ResNet-50: Bottleneck, (3, 4, 6, 3) blocks; fields as :class:`ResNetConfig`."""

    depth: int = field(default=50, metadata={"choices": tuple(DEPTHS)})


@dataclass
class ResNet101Config(ResNetConfig):
    """ResNet-101: Bottleneck, (3, 4, 23, 3) blocks; fields as :class:`ResNetConfig`."""

    depth: int = field(default=101, metadata={"choices": tuple(DEPTHS)})


@dataclass
class ResNet152Config(ResNetConfig):
    """ResNet-152: Bottleneck, (3, 8, 36, 3) blocks; fields as :class:`ResNetConfig`."""

    depth: int = field(default=152, metadata={"choices": tuple(DEPTHS)})


for _config in (ResNet18Config, ResNet34Config, ResNet50Config, ResNet101Config, ResNet152Config):
    _depth = _config.depth
    _block = "BasicBlock" if DEPTHS[_depth][0] == "basic" else "Bottleneck"
    MODELS.register(f"resnet{_depth}", config=_config, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                    description=f"ResNet-{_depth} ({_block}; torchvision v1.5 layout; stem imagenet|cifar).")(
        build_resnet)
