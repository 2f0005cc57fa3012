"""CRNN (Shi, Bai & Yao 2015): a conv stack, a bidirectional LSTM over the image columns, per-column logits.

The model maps images (B, H, W, C) to logits (B, T, num_classes) over ``T = W / 2**horizontal_pools`` columns,
read left to right: what CTC (objective ``ctc``) trains and the ``text_recognition`` task decodes. The conv
stages halve the height after every stage while it is above 1 and the width after the first
``horizontal_pools`` stages only, so the sequence keeps enough columns for a line of characters; whatever height
is left is flattened into each column's features.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.conv import conv_general_dilated
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm
from prism.framework.registry import MODELS


@dataclass
class CRNNConfig:
    """Conv stages -> columns -> bidirectional LSTM layers -> linear per-column classifier.

    widths: output channels of each 3x3 conv stage (conv, BatchNorm, ReLU, then max-pooling).
    horizontal_pools: how many of the first stages also halve the width (the sequence has W / 2**this columns).
    hidden: LSTM units per direction (and the size columns are projected to before the LSTMs).
    lstm_layers: stacked bidirectional LSTM layers (0: the projected conv columns go straight to the classifier).
    dropout: dropout rate before the classifier.
    num_classes: 0 means the dataset's (its alphabet plus CTC's blank).
    """

    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128], metadata={"ge": 1})
    horizontal_pools: int = field(default=2, metadata={"ge": 0})
    hidden: int = field(default=128, metadata={"ge": 1})
    lstm_layers: int = field(default=1, metadata={"ge": 0})
    dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})


def pools(cfg: CRNNConfig, height: int, width: int) -> tuple[list[tuple[int, int]], int, int]:
    """Each stage's (height, width) pooling window and the (height, columns) left after the stages."""
    windows = []
    for i in range(len(cfg.widths)):
        window = (2 if height >= 2 else 1, 2 if i < cfg.horizontal_pools else 1)
        windows.append(window)
        height, width = height // window[0], width // window[1]
    return windows, height, width


class BiLSTM(nnx.Module):
    """One bidirectional LSTM layer over (B, T, F): forward and backward outputs concatenated."""

    def __init__(self, in_features: int, hidden: int, *, rngs: nnx.Rngs) -> None:
        forward = nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden, rngs=rngs))
        backward = nnx.RNN(nnx.OptimizedLSTMCell(in_features, hidden, rngs=rngs), reverse=True, keep_order=True)
        self.layer = nnx.Bidirectional(forward, backward)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


class CRNN(nnx.Module):
    """conv-BN-ReLU-pool stages -> (B, T, h*C) columns -> linear -> BiLSTMs -> dropout -> linear logits."""

    def __init__(self, cfg: CRNNConfig, image_shape: tuple[int, int, int], num_classes: int, *,
                 rngs: nnx.Rngs) -> None:
        height, width, channels = image_shape
        self.windows, out_height, columns = pools(cfg, height, width)
        if columns < 1:
            raise ConfigError(f"model.horizontal_pools={cfg.horizontal_pools} halves the {width}-pixel width to no "
                              f"column; lower it")
        convs, norms = [], []
        for w in cfg.widths:
            convs.append(nnx.Conv(channels, w, kernel_size=(3, 3), use_bias=False,
                                  conv_general_dilated=conv_general_dilated, rngs=rngs))
            norms.append(BatchNorm(w, rngs=rngs))
            channels = w
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.project = nnx.Linear(out_height * channels, cfg.hidden, rngs=rngs)
        self.lstms = nnx.List([BiLSTM(cfg.hidden if i == 0 else 2 * cfg.hidden, cfg.hidden, rngs=rngs)
                               for i in range(cfg.lstm_layers)])
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
        self.head = nnx.Linear(2 * cfg.hidden if cfg.lstm_layers else cfg.hidden, num_classes, rngs=rngs)
        self.columns = columns

    def columns_of(self, x: jax.Array) -> jax.Array:
        """The conv stack's output as a left-to-right sequence of column features (B, T, hidden)."""
        for conv, norm, window in zip(self.convs, self.norms, self.windows, strict=True):
            x = nnx.relu(norm(conv(x)))
            if window != (1, 1):
                x = nnx.max_pool(x, window_shape=window, strides=window)
        b, h, w, c = x.shape
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(b, w, h * c)
        return nnx.relu(self.project(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Per-column logits (B, T, num_classes)."""
        x = self.columns_of(x)
        for lstm in self.lstms:
            x = lstm(x)
        return self.head(self.dropout(x))


@MODELS.register("crnn", config=CRNNConfig,
                 description="CRNN for text lines: conv stack, bidirectional LSTM over columns, per-column logits.")
def build_crnn(cfg: CRNNConfig, *, data: DataInfo, rngs: nnx.Rngs) -> CRNN:
    num_classes = cfg.num_classes or data.num_classes
    if num_classes < 2:
        raise ConfigError(f"model crnn needs at least 2 classes (CTC's blank and a character), got {num_classes}")
    return CRNN(cfg, tuple(data.image_shape), num_classes, rngs=rngs)
