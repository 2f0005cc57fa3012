"""AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower layout, with its AdaptiveAvgPool(6x6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.registry import MODELS
from prism.plugins.models._layers import (
    STEM_CONVS,
    adaptive_avg_pool,
    check_stem_conv,
    conv,
    linear,
    max_pool,
    num_classes_of,
    torch_default,
)
from prism.plugins.models._torch_import import TorchRules, nchw_flatten_linear

#: (out channels, kernel, stride, padding, max-pool after) of the five convs (torchvision.models.alexnet).
CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
         (256, 3, 1, 1, True))


@dataclass
class AlexNetConfig:
    """AlexNet: five convs (ReLU, three 3x3/2 max-pools), adaptive average pool to 6x6, two hidden FC layers.

    hidden: width of the two hidden fully connected layers (4096 in the paper and torchvision).
    dropout: dropout rate before each hidden FC layer (0.5).
    num_classes: 0 means the dataset's number of classes.
    stem_conv: how the strided first conv is computed: "space_to_depth" (a stride-1 conv on blocks of pixels,
        :class:`~plugins.models._layers.SpaceToDepthConv`) or "direct". Same function, same parameters.
    """

    hidden: int = field(default=4096, metadata={"ge": 1})
    dropout: float = field(default=0.5, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})
    stem_conv: str = field(default="direct", metadata={"choices": STEM_CONVS})


class AlexNet(nnx.Module):
    """convs -> AdaptiveAvgPool(6x6) -> flatten -> [dropout, fc, ReLU] x2 (``features``) -> linear ``head``.

    ``features`` is the 4096-d output of the second hidden FC layer (torchvision ``classifier[:-1]``);
    PyTorch flattens NCHW, we flatten NHWC (same parameter count, permuted rows in the first FC kernel).
    """

    def __init__(self, cfg: AlexNetConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        convs, channels, self.pool_after = [], in_channels, tuple(c[4] for c in CONVS)
        space_to_depth = check_stem_conv(cfg.stem_conv, "AlexNet")
        for i, (out, k, s, p, _) in enumerate(CONVS):
            convs.append(conv(channels, out, k, stride=s, padding=p, bias=True, kernel_init=torch_default,
                              rngs=rngs, space_to_depth=space_to_depth and i == 0))
            channels = out
        self.convs = nnx.List(convs)
        self.dropout1 = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.fc1 = linear(channels * 6 * 6, cfg.hidden, rngs=rngs)
        self.dropout2 = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.fc2 = linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.num_features = cfg.hidden
        self.head = linear(cfg.hidden, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Output of the second hidden FC layer (after ReLU), shape (batch, num_features)."""
        for layer, pool in zip(self.convs, self.pool_after, strict=True):
            x = nnx.relu(layer(x))
            if pool:
                x = max_pool(x, 3, 2)
        x = adaptive_avg_pool(x, 6).reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(self.dropout1(x)))
        return nnx.relu(self.fc2(self.dropout2(x)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def torch_rules(model: AlexNet) -> list:
    """torchvision ``alexnet`` state-dict names: ``features.0/3/6/8/10``, ``classifier.1/4/6``; the first FC
    layer's rows are permuted from torch's NCHW flatten to our NHWC one."""
    rules = TorchRules(model)
    for k, index in enumerate((0, 3, 6, 8, 10)):
        rules.add(f"convs.{k}", f"features.{index}")
    channels = model.convs[-1].out_features
    rules.add("fc1", "classifier.1", kernel_transform=nchw_flatten_linear(channels, 6, 6))
    return rules.add("fc2", "classifier.4").add("head", "classifier.6").rules


@MODELS.register("alexnet", config=AlexNetConfig, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                 description="AlexNet (torchvision layout, adaptive 6x6 average pool, any input size >= 63 px).")
def build_alexnet(cfg: AlexNetConfig, *, data: DataInfo, rngs: nnx.Rngs) -> AlexNet:
    return AlexNet(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)
