"""U-Net (Ronneberger et al. 2015): a contracting path of 3x3 convs and 2x2 max-pools, an expanding path of
2x2 up-convolutions concatenated with the (center-cropped) skip features, and a 1x1 conv to per-pixel logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.plugins.models._layers import batch_norm, conv, kaiming_normal_fan_in, max_pool, num_classes_of, zeros

PADDINGS = ("valid", "same")


@dataclass
class UNetConfig:
    """U-Net for semantic segmentation; outputs logits of shape (batch, H', W', num_classes).

    padding: "valid" (the paper: unpadded 3x3 convs, skip features center-cropped; a 572x572 input gives
        388x388 logits; input sizes must keep every level's size even before pooling) or "same" (padded
        convs: the output has the input's size; the up-sampled map is zero-padded to the skip's size
        when an odd size was floored by pooling).
    width: channels of the first level; level i has width * 2**i (64-128-256-512, bottleneck 1024).
    levels: number of down-sampling steps (4).
    batch_norm: BatchNorm after every 3x3 conv (not in the paper; the convs then have no bias).
    num_classes: 0 means the dataset's number of classes.
    """

    padding: str = field(default="valid", metadata={"choices": PADDINGS})
    width: int = field(default=64, metadata={"ge": 1})
    levels: int = field(default=4, metadata={"ge": 1})
    batch_norm: bool = False
    num_classes: int = field(default=0, metadata={"ge": 0})


class DoubleConv(nnx.Module):
    """Two 3x3 convs, each followed by [BN and] ReLU."""

    def __init__(self, in_ch: int, out_ch: int, pad: int, use_bn: bool, *, rngs: nnx.Rngs):
        kw = dict(padding=pad, bias=not use_bn, kernel_init=kaiming_normal_fan_in, rngs=rngs)
        self.conv1 = conv(in_ch, out_ch, 3, **kw)
        self.bn1 = batch_norm(out_ch, rngs=rngs) if use_bn else None
        self.conv2 = conv(out_ch, out_ch, 3, **kw)
        self.bn2 = batch_norm(out_ch, rngs=rngs) if use_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv1(x)
        x = nnx.relu(self.bn1(x) if self.bn1 is not None else x)
        x = self.conv2(x)
        return nnx.relu(self.bn2(x) if self.bn2 is not None else x)


def center_crop(x: jax.Array, h: int, w: int) -> jax.Array:
    """The central (h, w) window of NHWC ``x`` (the paper's cropping of skip connections)."""
    top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
    return x[:, top:top + h, left:left + w]


class UNet(nnx.Module):
    """Encoder levels (DoubleConv, max-pool) -> bottleneck -> decoder levels (up-conv, concat skip, DoubleConv)."""

    def __init__(self, cfg: UNetConfig, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        if cfg.padding not in PADDINGS:
            raise ConfigError(f"model.padding must be one of {PADDINGS} (U-Net), got {cfg.padding!r}")
        self.valid = cfg.padding == "valid"
        pad = 0 if self.valid else 1
        widths = [cfg.width * 2**i for i in range(cfg.levels + 1)]
        down, channels = [], in_channels
        for w in widths[:-1]:
            down.append(DoubleConv(channels, w, pad, cfg.batch_norm, rngs=rngs))
            channels = w
        self.down = nnx.List(down)
        self.bottleneck = DoubleConv(channels, widths[-1], pad, cfg.batch_norm, rngs=rngs)
        ups, up_convs = [], []
        for w in reversed(widths[:-1]):  # "up-conv 2x2 that halves the number of feature channels"
            up_convs.append(nnx.ConvTranspose(2 * w, w, kernel_size=(2, 2), strides=(2, 2), padding="VALID",
                                              kernel_init=kaiming_normal_fan_in, bias_init=zeros, rngs=rngs))
            ups.append(DoubleConv(2 * w, w, pad, cfg.batch_norm, rngs=rngs))
        self.up_convs, self.up = nnx.List(up_convs), nnx.List(ups)
        self.out = conv(widths[0], num_classes, 1, bias=True, kernel_init=kaiming_normal_fan_in, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = max_pool(x, 2, 2)
        x = self.bottleneck(x)
        for up_conv, block, skip in zip(self.up_convs, self.up, reversed(skips), strict=True):
            x = up_conv(x)
            if self.valid:
                skip = center_crop(skip, x.shape[1], x.shape[2])
            elif x.shape[1:3] != skip.shape[1:3]:
                dh, dw = skip.shape[1] - x.shape[1], skip.shape[2] - x.shape[2]
                x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
            x = block(jnp.concatenate([skip, x], axis=-1))
        return self.out(x)


def output_size(size: int, levels: int = 4) -> int:
    """Output side of a valid-padding U-Net for an input side ``size`` (572 -> 388)."""
    for _ in range(levels):
        if (size - 4) % 2:
            raise ConfigError(f"valid U-Net: a feature map of odd size {size - 4} would be pooled "
                              "(model.padding=valid needs image sizes that stay even; model.padding=same takes any)")
        size = (size - 4) // 2
    size -= 4
    for _ in range(levels):
        size = 2 * size - 4
    return size


@MODELS.register("unet", config=UNetConfig, default_image_shape=(572, 572, 1),
                 description="U-Net (Ronneberger 2015: 64-1024 channels, up-conv 2x2, padding valid|same, "
                             "optional BN); per-pixel logits.")
def build_unet(cfg: UNetConfig, *, data: DataInfo, rngs: nnx.Rngs) -> UNet:
    return UNet(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)
