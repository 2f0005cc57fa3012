"""A small CNN for aligned faces: conv stages, then the last feature map *flattened* into a linear layer.

Global average pooling (``simple_cnn``) throws away where on the face a pattern is; face recognition networks
keep it: insightface's ResNets end with BatchNorm -> dropout -> flatten -> Linear -> BatchNorm over the whole
7x7 map. ``face_cnn`` does the same on a small conv stack, so its ``features`` (what ``objective=arcface|cosface``
puts its embedding head on) depend on the layout of the face. Sized for 32x32 to 64x64 grey or RGB images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.conv import conv_general_dilated
from prism.framework.layers import BatchNorm
from prism.framework.registry import MODELS


@dataclass
class FaceCNNConfig:
    """widths: output channels of each 3x3 conv stage (conv, BatchNorm, ReLU; 2x2 max-pooling after every stage
        but the last).
    features: width of the linear layer on the flattened last feature map (``num_features``).
    dropout: dropout rate on the flattened map.
    num_classes: 0 means the dataset's number of classes (the classification head, unused by the margin
        objectives).
    """

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128], metadata={"ge": 1})
    features: int = field(default=256, metadata={"ge": 1})
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})


class FaceCNN(nnx.Module):
    """conv-BN-ReLU stages -> flatten -> dropout -> Linear -> BatchNorm (``features``) -> linear head."""

    def __init__(self, cfg: FaceCNNConfig, image_shape: tuple[int, int, int], num_classes: int, *,
                 rngs: nnx.Rngs):
        convs, norms, channels = [], [], image_shape[-1]
        height, width = image_shape[:2]
        for i, stage_width in enumerate(cfg.widths):
            convs.append(nnx.Conv(channels, stage_width, kernel_size=(3, 3), use_bias=False,
                                  conv_general_dilated=conv_general_dilated, rngs=rngs))
            norms.append(BatchNorm(stage_width, rngs=rngs))
            channels = stage_width
            if i < len(cfg.widths) - 1:
                height, width = height // 2, width // 2
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.fc = nnx.Linear(max(height, 1) * max(width, 1) * channels, cfg.features, use_bias=False, rngs=rngs)
        self.fc_norm = BatchNorm(cfg.features, rngs=rngs)
        self.head = nnx.Linear(cfg.features, num_classes, rngs=rngs)
        self.num_features = cfg.features

    def features(self, x: jax.Array) -> jax.Array:
        """The flattened last feature map through Linear + BatchNorm, shape (batch, num_features)."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = nnx.relu(norm(conv(x)))
            if i < len(self.convs) - 1:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        return self.fc_norm(self.fc(self.dropout(x.reshape(x.shape[0], math.prod(x.shape[1:])))))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@MODELS.register("face_cnn", config=FaceCNNConfig, default_image_shape=(48, 40, 1),
                 description="Small CNN whose features flatten the last map (keeps the face's layout), for faces.")
def build_face_cnn(cfg: FaceCNNConfig, *, data: DataInfo, rngs: nnx.Rngs) -> FaceCNN:
    return FaceCNN(cfg, tuple(data.image_shape), cfg.num_classes or data.num_classes, rngs=rngs)
