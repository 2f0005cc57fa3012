"""A small convolutional classifier: the default model, sized for 8x8 to 32x32 images."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.conv import conv_general_dilated
from prism.framework.layers import BatchNorm
from prism.framework.registry import MODELS
from prism.framework.taps import tap


@dataclass
class SimpleCNNConfig:
    """Conv stages followed by global average pooling and a linear head.

    widths: output channels of each 3x3 conv stage (each stage: conv, BatchNorm, ReLU; 2x2
        max-pooling after every stage but the last).
    dropout: dropout rate before the head.
    num_classes: 0 means the dataset's number of classes.
    """

    widths: list[int] = field(default_factory=lambda: [32, 64], metadata={"ge": 1})
    dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})


class SimpleCNN(nnx.Module):
    """conv-BN-ReLU stages -> global average pool -> dropout -> linear head.

    Tapped feature maps (``tap_layers``, :mod:`prism.framework.taps`): ``stage1``, ``stage2``, ...: each stage's
    ReLU output, before its max-pool (the last one explained by default)."""

    def __init__(self, cfg: SimpleCNNConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        convs, norms, channels = [], [], in_channels
        for width in cfg.widths:
            convs.append(nnx.Conv(channels, width, kernel_size=(3, 3), use_bias=False,
                                   conv_general_dilated=conv_general_dilated, rngs=rngs))
            norms.append(BatchNorm(width, rngs=rngs))
            channels = width
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)
        self.num_features = channels
        self.tap_layers = tuple(f"stage{i + 1}" for i in range(len(cfg.widths)))

    def features(self, x: jax.Array) -> jax.Array:
        """Pooled backbone features, shape (batch, num_features)."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = tap(f"stage{i + 1}", nnx.relu(norm(conv(x))))
            if i < len(self.convs) - 1:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return x.mean(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.dropout(self.features(x)))


@MODELS.register("simple_cnn", config=SimpleCNNConfig, description="Small conv-BN-ReLU classifier (default).")
def build_simple_cnn(cfg: SimpleCNNConfig, *, data: DataInfo, rngs: nnx.Rngs) -> SimpleCNN:
    return SimpleCNN(cfg, data.image_shape[-1], cfg.num_classes or data.num_classes, rngs=rngs)
