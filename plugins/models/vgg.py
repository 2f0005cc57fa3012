"""VGG-11/16 (Simonyan & Zisserman 2015), with and without BatchNorm, in torchvision's layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.taps import tap
from prism.plugins.models._layers import (
    adaptive_avg_pool,
    batch_norm,
    conv,
    kaiming_normal_fan_out,
    linear,
    max_pool,
    num_classes_of,
)
from prism.plugins.models._torch_import import TorchRules, nchw_flatten_linear

#: depth -> conv widths, "M" = 2x2 max-pool (torchvision configurations "A" and "D").
LAYOUTS = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
_fc_init = nnx.initializers.normal(0.01)


@dataclass
class VGGConfig:
    """VGG: 3x3 convs (with bias) + ReLU in five max-pooled groups, adaptive 7x7 average pool, 2 hidden FC layers.

    depth: 11, 13, 16 or 19 conv+FC layers.
    batch_norm: BatchNorm after every conv (torchvision ``vgg*_bn``; the convs keep their bias, as there).
    hidden: width of the two hidden FC layers (4096).
    dropout: dropout rate after each hidden FC layer (0.5).
    num_classes: 0 means the dataset's number of classes.
    """

    depth: int = field(default=16, metadata={"choices": tuple(LAYOUTS)})
    batch_norm: bool = False
    hidden: int = field(default=4096, metadata={"ge": 1})
    dropout: float = field(default=0.5, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})


class VGG(nnx.Module):
    """conv groups -> AdaptiveAvgPool(7x7) -> flatten -> [fc, ReLU, dropout] x2 (``features``) -> ``head``.

    Tapped feature maps (``tap_layers``, :mod:`prism.framework.taps`): ``stage1``..``stage5``, each conv group's
    output after its max-pool (the last one explained by default)."""

    def __init__(self, cfg: VGGConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        if cfg.depth not in LAYOUTS:
            raise ConfigError(f"model.depth must be one of {sorted(LAYOUTS)} (VGG), got {cfg.depth}")
        convs, norms, self.pool_after, channels = [], [], [], in_channels
        for item in LAYOUTS[cfg.depth]:
            if item == "M":
                self.pool_after[-1] = True
                continue
            convs.append(conv(channels, item, 3, bias=True, kernel_init=kaiming_normal_fan_out, rngs=rngs))
            norms.append(batch_norm(item, rngs=rngs) if cfg.batch_norm else None)
            self.pool_after.append(False)
            channels = item
        self.pool_after = tuple(self.pool_after)
        self.tap_layers = tuple(f"stage{i + 1}" for i in range(sum(self.pool_after)))
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.fc1 = linear(channels * 7 * 7, cfg.hidden, kernel_init=_fc_init, rngs=rngs)
        self.dropout1 = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.fc2 = linear(cfg.hidden, cfg.hidden, kernel_init=_fc_init, rngs=rngs)
        self.dropout2 = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.num_features = cfg.hidden
        self.head = linear(cfg.hidden, num_classes, kernel_init=_fc_init, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Output of the second hidden FC layer (after ReLU and dropout), shape (batch, num_features)."""
        stage = 0
        for layer, norm, pool in zip(self.convs, self.norms, self.pool_after, strict=True):
            x = layer(x)
            if norm is not None:
                x = norm(x)
            x = nnx.relu(x)
            if pool:
                stage += 1
                x = tap(f"stage{stage}", max_pool(x, 2, 2))
        x = adaptive_avg_pool(x, 7).reshape(x.shape[0], -1)
        x = self.dropout1(nnx.relu(self.fc1(x)))
        return self.dropout2(nnx.relu(self.fc2(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def torch_rules(model: VGG) -> list:
    """torchvision ``vgg*`` state-dict names: ``features.N`` numbered over conv[, BN], ReLU and max-pool layers;
    ``classifier.0/3/6``. The first FC layer's rows are permuted from torch's NCHW flatten to our NHWC one."""
    rules, index = TorchRules(model), 0
    for k, (norm, pool) in enumerate(zip(model.norms, model.pool_after, strict=True)):
        rules.add(f"convs.{k}", f"features.{index}")
        if norm is not None:
            rules.add(f"norms.{k}", f"features.{index + 1}")
        index += (3 if norm is not None else 2) + int(pool)
    channels = model.convs[-1].out_features
    rules.add("fc1", "classifier.0", kernel_transform=nchw_flatten_linear(channels, 7, 7))
    return rules.add("fc2", "classifier.3").add("head", "classifier.6").rules


def build_vgg(cfg: VGGConfig, *, data: DataInfo, rngs: nnx.Rngs) -> VGG:
    return VGG(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)


@dataclass
class VGG11Config(VGGConfig):
    """VGG-11 (configuration "A"); fields as :class:`VGGConfig`."""

    depth: int = field(default=11, metadata={"choices": tuple(LAYOUTS)})


@dataclass
class VGG11BNConfig(VGGConfig):
    """VGG-11 with BatchNorm; fields as :class:`VGGConfig`."""

    depth: int = field(default=11, metadata={"choices": tuple(LAYOUTS)})
    batch_norm: bool = True


@dataclass
class VGG16Config(VGGConfig):
    """VGG-16 (configuration "D"); fields as :class:`VGGConfig`."""

    depth: int = field(default=16, metadata={"choices": tuple(LAYOUTS)})


@dataclass
class VGG16BNConfig(VGGConfig):
    """VGG-16 with BatchNorm; fields as :class:`VGGConfig`."""

    depth: int = field(default=16, metadata={"choices": tuple(LAYOUTS)})
    batch_norm: bool = True


for _name, _config in (("vgg11", VGG11Config), ("vgg11_bn", VGG11BNConfig), ("vgg16", VGG16Config),
                       ("vgg16_bn", VGG16BNConfig)):
    _bn = " with BatchNorm" if _config.batch_norm else ""
    MODELS.register(_name, config=_config, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                    description=f"VGG-{_config.depth}{_bn} (torchvision layout, adaptive 7x7 pool, 4096-4096 FC).")(
        build_vgg)
