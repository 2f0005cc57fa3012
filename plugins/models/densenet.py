"""DenseNet-121 (Huang et al. 2017) in torchvision's layout: DenseNet-BC, growth 32, blocks (6, 12, 24, 16)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import MODELS
from prism.framework.taps import tap
from prism.plugins.models._layers import (
    STEM_CONVS,
    avg_pool,
    batch_norm,
    check_stem_conv,
    conv,
    kaiming_normal_fan_in,
    linear,
    max_pool,
    num_classes_of,
)
from prism.plugins.models._torch_import import TorchRules


@dataclass
class DenseNetConfig:
    """DenseNet-BC: a 7x7 stem, dense blocks of BN-ReLU-1x1-BN-ReLU-3x3 layers joined by compressing transitions.

    growth_rate: channels each dense layer adds (k = 32).
    block_config: number of dense layers in each block ((6, 12, 24, 16) for DenseNet-121).
    num_init_features: output channels of the stem conv (64).
    bn_size: bottleneck width factor: the 1x1 conv outputs bn_size * growth_rate channels (4).
    compression: channel reduction of each transition (0.5: halve).
    drop_rate: dropout after each dense layer (0 in torchvision's densenet121).
    num_classes: 0 means the dataset's number of classes.
    stem_conv: how the strided first conv is computed: "space_to_depth" (a stride-1 conv on blocks of pixels,
        :class:`~plugins.models._layers.SpaceToDepthConv`) or "direct". Same function, same parameters.
    """

    growth_rate: int = field(default=32, metadata={"ge": 1})
    block_config: list[int] = field(default_factory=lambda: [6, 12, 24, 16], metadata={"ge": 1})
    num_init_features: int = field(default=64, metadata={"ge": 1})
    bn_size: int = field(default=4, metadata={"ge": 1})
    compression: float = field(default=0.5, metadata={"gt": 0, "le": 1})
    drop_rate: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})
    stem_conv: str = field(default="space_to_depth", metadata={"choices": STEM_CONVS})


class DenseLayer(nnx.Module):
    """BN-ReLU-1x1 conv (bn_size * k) -> BN-ReLU-3x3 conv (k) [-> dropout]; returns only the k new channels."""

    def __init__(self, in_ch: int, growth: int, bn_size: int, drop_rate: float, *, rngs: nnx.Rngs):
        self.norm1 = batch_norm(in_ch, rngs=rngs)
        self.conv1 = conv(in_ch, bn_size * growth, 1, kernel_init=kaiming_normal_fan_in, rngs=rngs)
        self.norm2 = batch_norm(bn_size * growth, rngs=rngs)
        self.conv2 = conv(bn_size * growth, growth, 3, kernel_init=kaiming_normal_fan_in, rngs=rngs)
        self.dropout = nnx.Dropout(drop_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv1(nnx.relu(self.norm1(x)))
        return self.dropout(self.conv2(nnx.relu(self.norm2(y))))


class Transition(nnx.Module):
    """BN-ReLU-1x1 conv (compress channels) -> 2x2 average pool."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        self.norm = batch_norm(in_ch, rngs=rngs)
        self.conv = conv(in_ch, out_ch, 1, kernel_init=kaiming_normal_fan_in, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool(self.conv(nnx.relu(self.norm(x))), 2, 2)


class DenseNet(nnx.Module):
    """stem -> dense blocks + transitions -> BN-ReLU -> global average pool (``features``) -> linear ``head``.

    Tapped feature maps (``tap_layers``, :mod:`prism.framework.taps`): ``stem``, ``block1``..``block4`` (each
    dense block's output, before its transition) and ``final`` (the last BN-ReLU, explained by default)."""

    def __init__(self, cfg: DenseNetConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        k = cfg.growth_rate
        self.conv0 = conv(in_channels, cfg.num_init_features, 7, stride=2, padding=3,
                          kernel_init=kaiming_normal_fan_in, rngs=rngs,
                          space_to_depth=check_stem_conv(cfg.stem_conv, "DenseNet"))
        self.norm0 = batch_norm(cfg.num_init_features, rngs=rngs)
        blocks, transitions, channels = [], [], cfg.num_init_features
        for i, n in enumerate(cfg.block_config):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, k, cfg.bn_size, cfg.drop_rate, rngs=rngs))
                channels += k
            blocks.append(nnx.List(layers))
            if i < len(cfg.block_config) - 1:
                out = int(channels * cfg.compression)
                transitions.append(Transition(channels, out, rngs=rngs))
                channels = out
        self.blocks, self.transitions = nnx.List(blocks), nnx.List(transitions)
        self.norm5 = batch_norm(channels, rngs=rngs)
        self.num_features = channels
        self.head = linear(channels, num_classes, rngs=rngs)
        self.tap_layers = ("stem", *(f"block{i + 1}" for i in range(len(blocks))), "final")

    def features(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled output of the final BN-ReLU, shape (batch, num_features)."""
        x = tap("stem", max_pool(nnx.relu(self.norm0(self.conv0(x))), 3, 2, padding=1))
        for i, block in enumerate(self.blocks):
            for layer in block:
                x = jnp.concatenate([x, layer(x)], axis=-1)
            x = tap(f"block{i + 1}", x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return tap("final", nnx.relu(self.norm5(x))).mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


#: torchvision's original DenseNet files name ``denselayer1.norm.1``, ``conv.2``; its loader renames them too.
_LEGACY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def torch_rename(key: str) -> str:
    """``...denselayer1.norm.1.weight`` (torchvision's published densenet files) -> ``...denselayer1.norm1.weight``."""
    match = _LEGACY.match(key)
    return match[1] + match[2] if match else key


def torch_rules(model: DenseNet) -> list:
    """torchvision ``densenet*`` state-dict names (``features.denseblock1.denselayer1.norm1``,
    ``features.transition1.conv``, ``features.norm5``, ``classifier``)."""
    rules = TorchRules(model).add("conv0", "features.conv0").add("norm0", "features.norm0")
    for i, block in enumerate(model.blocks):
        for j in range(len(block)):
            theirs = f"features.denseblock{i + 1}.denselayer{j + 1}"
            for part in ("norm1", "conv1", "norm2", "conv2"):
                rules.add(f"blocks.{i}.{j}.{part}", f"{theirs}.{part}")
        if i < len(model.transitions):
            rules.add(f"transitions.{i}.norm", f"features.transition{i + 1}.norm")
            rules.add(f"transitions.{i}.conv", f"features.transition{i + 1}.conv")
    return rules.add("norm5", "features.norm5").add("head", "classifier").rules


@MODELS.register("densenet121", config=DenseNetConfig, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                 torch_rename=torch_rename,
                 description="DenseNet-121 (torchvision layout: growth 32, blocks 6-12-24-16, bn_size 4, "
                             "compression 0.5).")
def build_densenet(cfg: DenseNetConfig, *, data: DataInfo, rngs: nnx.Rngs) -> DenseNet:
    return DenseNet(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)
