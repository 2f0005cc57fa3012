"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout: inverted residuals with linear bottlenecks."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import MODELS
from prism.framework.taps import tap
from prism.plugins.models._layers import STEM_CONVS, batch_norm, check_stem_conv, conv, linear, num_classes_of
from prism.plugins.models._torch_import import TorchRules

#: (expansion t, output channels c, repeats n, first stride s), torchvision.models.mobilenetv2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
_fc_init = nnx.initializers.normal(0.01)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to the nearest multiple of ``divisor``, never below
    ``min_value`` (default ``divisor``) and never more than 10% below ``value``."""
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


@dataclass
class MobileNetV2Config:
    """MobileNetV2.

    width_mult: multiplies every layer's channels (rounded to multiples of ``round_nearest``); the last
        conv keeps 1280 channels unless width_mult > 1.
    round_nearest: channel counts are rounded to multiples of this (8).
    dropout: dropout rate before the classifier (0.2).
    num_classes: 0 means the dataset's number of classes.
    stem_conv: how the strided first conv is computed: "space_to_depth" (a stride-1 conv on blocks of pixels,
        :class:`~plugins.models._layers.SpaceToDepthConv`) or "direct". Same function, same parameters.
    stem: "imagenet" (torchvision: overall stride 32, for ~224 px images) or "cifar" (the stem conv and the
        first 24-channel stage at stride 1, overall stride 8, for ~32 px images: the common CIFAR variant,
        e.g. kuangliu/pytorch-cifar; same parameters, so torchvision weights still load).
    """

    width_mult: float = field(default=1.0, metadata={"gt": 0})
    round_nearest: int = field(default=8, metadata={"ge": 1})
    dropout: float = field(default=0.2, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})
    stem_conv: str = field(default="space_to_depth", metadata={"choices": STEM_CONVS})
    stem: str = field(default="imagenet", metadata={"choices": ("imagenet", "cifar")})


class ConvBNReLU6(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, *, rngs: nnx.Rngs,
                 space_to_depth: bool = False):
        self.conv = conv(in_ch, out_ch, kernel, stride=stride, groups=groups, rngs=rngs, space_to_depth=space_to_depth)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu6(self.bn(self.conv(x)))


class InvertedResidual(nnx.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN (linear) [+ identity]."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, *, rngs: nnx.Rngs):
        hidden = int(round(in_ch * expand))
        self.use_residual = stride == 1 and in_ch == out_ch
        self.expand = ConvBNReLU6(in_ch, hidden, 1, rngs=rngs) if expand != 1 else None
        self.depthwise = ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden, rngs=rngs)
        self.project = conv(hidden, out_ch, 1, rngs=rngs)
        self.project_bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.expand(x) if self.expand is not None else x
        y = self.project_bn(self.project(self.depthwise(y)))
        return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
    """stem conv -> inverted residual stages -> 1x1 conv to 1280 -> global average pool (``features``) -> head.

    Tapped feature maps (``tap_layers``, :mod:`prism.framework.taps`): ``stem``, ``block1``..``block17`` (each
    inverted residual's output) and ``last`` (the final 1x1 conv, explained by default)."""

    def __init__(self, cfg: MobileNetV2Config, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        channels = make_divisible(32 * cfg.width_mult, cfg.round_nearest)
        last = make_divisible(1280 * max(1.0, cfg.width_mult), cfg.round_nearest)
        cifar = cfg.stem == "cifar"
        self.stem = ConvBNReLU6(in_channels, channels, 3, 1 if cifar else 2, rngs=rngs,
                                space_to_depth=not cifar and check_stem_conv(cfg.stem_conv, "MobileNetV2"))
        blocks = []
        for stage, (t, c, n, s) in enumerate(SETTINGS):
            s = 1 if cifar and stage == 1 else s
            out = make_divisible(c * cfg.width_mult, cfg.round_nearest)
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, t, rngs=rngs))
                channels = out
        self.blocks = nnx.List(blocks)
        self.last = ConvBNReLU6(channels, last, 1, rngs=rngs)
        self.num_features = last
        self.tap_layers = ("stem", *(f"block{i + 1}" for i in range(len(blocks))), "last")
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.head = linear(last, num_classes, kernel_init=_fc_init, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled output of the last 1x1 conv, shape (batch, num_features)."""
        x = tap("stem", self.stem(x))
        for i, block in enumerate(self.blocks):
            x = tap(f"block{i + 1}", block(x))
        return tap("last", self.last(x)).mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.features(x)))


def torch_rules(model: MobileNetV2) -> list:
    """torchvision ``mobilenet_v2`` state-dict names: ``features.0`` stem, ``features.1..17`` inverted residuals
    (``conv.0`` [expand], then depthwise, project conv and its BN numbered on), ``features.18`` last conv,
    ``classifier.1``."""
    rules = TorchRules(model).add("stem.conv", "features.0.0").add("stem.bn", "features.0.1")
    for k, block in enumerate(model.blocks):
        ours, theirs, index = f"blocks.{k}", f"features.{k + 1}.conv", 0
        if block.expand is not None:
            rules.add(f"{ours}.expand.conv", f"{theirs}.0.0").add(f"{ours}.expand.bn", f"{theirs}.0.1")
            index = 1
        rules.add(f"{ours}.depthwise.conv", f"{theirs}.{index}.0").add(f"{ours}.depthwise.bn", f"{theirs}.{index}.1")
        rules.add(f"{ours}.project", f"{theirs}.{index + 1}").add(f"{ours}.project_bn", f"{theirs}.{index + 2}")
    last = f"features.{len(model.blocks) + 1}"
    return rules.add("last.conv", f"{last}.0").add("last.bn", f"{last}.1").add("head", "classifier.1").rules


@MODELS.register("mobilenet_v2", config=MobileNetV2Config, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                 description="MobileNetV2 (torchvision layout; width_mult with channels rounded to multiples of 8).")
def build_mobilenet_v2(cfg: MobileNetV2Config, *, data: DataInfo, rngs: nnx.Rngs) -> MobileNetV2:
    return MobileNetV2(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)
