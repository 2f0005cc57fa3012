"""YOLOv3 (Redmon & Farhadi 2018): the Darknet-53 backbone and the three-scale head of darknet's ``yolov3.cfg``
(also ultralytics' ``yolov3.yaml``), and the decoding of its raw outputs into boxes.

The decoding lives with the network because it needs the network's anchors and strides: ``detect(x)`` is
the detection task's model contract (boxes and class scores per candidate); the ``yolo`` objective decodes
with :func:`decode_scale` too. The loss is the ``yolo`` objective; NMS and mAP belong to the detection task."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.plugins.models._layers import batch_norm, conv, num_classes_of, torch_default

#: COCO anchors (width, height in pixels) of yolov3.cfg, three per scale, for strides 8, 16, 32.
COCO_ANCHORS = [10, 13, 16, 30, 33, 23, 30, 61, 62, 45, 59, 119, 116, 90, 156, 198, 373, 326]
STRIDES = (32, 16, 8)  # order of the outputs


@dataclass
class YOLOv3Config:
    """YOLOv3 detector network.

    num_classes: 0 means the dataset's number of classes (80 for COCO).
    width: channels of Darknet-53's first conv (32); every layer scales with it (for cheap test models).
    blocks: residual blocks in each of Darknet-53's five down-sampling stages ((1, 2, 8, 8, 4)).
    anchors: flat (w, h) pixel pairs, three per scale from the finest (stride 8) to the coarsest (stride 32);
        the network only needs their count (3 per scale); the loss/decoder reads them from here.
    """

    num_classes: int = field(default=0, metadata={"ge": 0})
    width: int = field(default=32, metadata={"ge": 1})
    blocks: list[int] = field(default_factory=lambda: [1, 2, 8, 8, 4], metadata={"ge": 0})
    anchors: list[int] = field(default_factory=lambda: list(COCO_ANCHORS), metadata={"ge": 1})


class ConvBNLeaky(nnx.Module):
    """darknet's ``[convolutional] batch_normalize=1 activation=leaky``: conv (no bias), BN, LeakyReLU(0.1)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, kernel, stride=stride, kernel_init=torch_default, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.leaky_relu(self.bn(self.conv(x)), 0.1)


class Residual(nnx.Module):
    """Darknet residual block: 1x1 conv to half the channels, 3x3 conv back, + identity."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv1 = ConvBNLeaky(channels, channels // 2, 1, rngs=rngs)
        self.conv2 = ConvBNLeaky(channels // 2, channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(self.conv1(x))


class Darknet53(nnx.Module):
    """3x3 conv, then five stages of (3x3 stride-2 conv, residual blocks). Returns the stride 8/16/32 maps."""

    def __init__(self, in_channels: int, width: int, blocks: list[int], *, rngs: nnx.Rngs):
        self.stem = ConvBNLeaky(in_channels, width, 3, rngs=rngs)
        downs, stages, channels = [], [], width
        for i, n in enumerate(blocks):
            out = width * 2 ** (i + 1)
            downs.append(ConvBNLeaky(channels, out, 3, 2, rngs=rngs))
            stages.append(nnx.List([Residual(out, rngs=rngs) for _ in range(n)]))
            channels = out
        self.downs, self.stages = nnx.List(downs), nnx.List(stages)
        self.channels = tuple(width * 2 ** (i + 1) for i in range(len(blocks)))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = self.stem(x)
        outs = []
        for down, stage in zip(self.downs, self.stages, strict=True):
            x = down(x)
            for block in stage:
                x = block(x)
            outs.append(x)
        return outs[-3], outs[-2], outs[-1]  # strides 8, 16, 32


def prior_bias(num_classes: int, stride: int) -> np.ndarray:
    """Initial bias of a prediction conv, shape (3, 5 + num_classes): ultralytics' priors (objectness ~ 8
    objects per 640x640 image, class probability ~ 0.6 / num_classes) so that early losses are balanced."""
    bias = np.zeros((3, 5 + num_classes), np.float32)
    bias[:, 4] = math.log(8 / (640 / stride) ** 2)
    bias[:, 5:] = math.log(0.6 / (num_classes - 0.99)) if num_classes > 1 else 0.0
    return bias


class _HeadBranch(nnx.Module):
    """Five alternating 1x1/3x3 convs (the 1x1 output feeds the next scale), a 3x3 conv and the 1x1 prediction."""

    def __init__(self, in_ch: int, ch: int, out_ch: int, stride: int, num_classes: int, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvBNLeaky(in_ch, ch, 1, rngs=rngs), ConvBNLeaky(ch, 2 * ch, 3, rngs=rngs),
                               ConvBNLeaky(2 * ch, ch, 1, rngs=rngs), ConvBNLeaky(ch, 2 * ch, 3, rngs=rngs),
                               ConvBNLeaky(2 * ch, ch, 1, rngs=rngs)])
        self.out_conv = ConvBNLeaky(ch, 2 * ch, 3, rngs=rngs)
        bias = prior_bias(num_classes, stride)
        self.pred = conv(2 * ch, out_ch, 1, bias=True, kernel_init=torch_default,
                         bias_init=lambda key, shape, dtype=jnp.float32: jnp.asarray(bias.reshape(shape), dtype),
                         rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for layer in self.convs:
            x = layer(x)
        return x, self.pred(self.out_conv(x))


class YOLOv3(nnx.Module):
    """Darknet-53 -> FPN-style head; ``__call__`` returns predictions for strides (32, 16, 8), each of shape
    (batch, H/s, W/s, 3, 5 + num_classes) holding raw (tx, ty, tw, th, objectness, class logits)."""

    strides = STRIDES

    def __init__(self, cfg: YOLOv3Config, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        if len(cfg.blocks) != 5:
            raise ConfigError(f"model.blocks: Darknet-53 has 5 stages, got {cfg.blocks}")
        if len(cfg.anchors) != 18:
            raise ConfigError(f"model.anchors must hold 9 (w, h) pairs, 3 per scale; got {len(cfg.anchors)} numbers")
        self.num_classes = num_classes
        self.anchors = tuple(tuple(cfg.anchors[i:i + 2]) for i in range(0, 18, 2))
        self.backbone = Darknet53(in_channels, cfg.width, cfg.blocks, rngs=rngs)
        c3, c4, c5 = self.backbone.channels[-3:]
        out = 3 * (5 + num_classes)
        h = cfg.width * 16  # 512 channels in the coarsest branch
        self.head32 = _HeadBranch(c5, h, out, 32, num_classes, rngs=rngs)
        self.lateral16 = ConvBNLeaky(h, h // 2, 1, rngs=rngs)
        self.head16 = _HeadBranch(c4 + h // 2, h // 2, out, 16, num_classes, rngs=rngs)
        self.lateral8 = ConvBNLeaky(h // 2, h // 4, 1, rngs=rngs)
        self.head8 = _HeadBranch(c3 + h // 4, h // 4, out, 8, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c3, c4, c5 = self.backbone(x)
        route, p32 = self.head32(c5)
        route, p16 = self.head16(jnp.concatenate([_upsample2(self.lateral16(route)), c4], axis=-1))
        _, p8 = self.head8(jnp.concatenate([_upsample2(self.lateral8(route)), c3], axis=-1))
        return tuple(p.reshape(*p.shape[:3], 3, 5 + self.num_classes) for p in (p32, p16, p8))


    def output_anchors(self) -> list[tuple[tuple[int, int], ...]]:
        """The three (w, h) pixel anchors of each output, in output order (strides 32, 16, 8)."""
        by_stride = {8: self.anchors[0:3], 16: self.anchors[3:6], 32: self.anchors[6:9]}
        return [by_stride[s] for s in self.strides]

    def detect(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Every anchor's decoded box and class scores: boxes (B, N, 4) normalized ``[ymin, xmin, ymax, xmax]``,
        scores (B, N, C) = sigmoid(objectness) * sigmoid(class logit) (YOLOv3's independent class scores)."""
        outputs = self(x)
        image_hw = x.shape[1:3]
        boxes, scores = [], []
        for out, stride, anchors in zip(outputs, self.strides, self.output_anchors(), strict=True):
            b = decode_scale(out, anchors, stride)
            boxes.append((b / jnp.array([*image_hw, *image_hw], b.dtype)).reshape(b.shape[0], -1, 4))
            s = jax.nn.sigmoid(out[..., 4:5].astype(jnp.float32)) * jax.nn.sigmoid(out[..., 5:].astype(jnp.float32))
            scores.append(s.reshape(s.shape[0], -1, self.num_classes))
        return jnp.concatenate(boxes, axis=1).astype(jnp.float32), jnp.concatenate(scores, axis=1)


#: Largest raw width/height offset decoded (exp(6.9) ~ 1000x the anchor), against overflow early in training.
MAX_LOG_SCALE = 6.9


def decode_scale(out: jax.Array, anchors, stride: int) -> jax.Array:
    """Pixel boxes ``[ymin, xmin, ymax, xmax]`` (B, H, W, 3, 4) of one output (B, H, W, 3, 5 + C):
    centre = (cell + sigmoid(t_xy)) * stride, size = anchor * exp(t_wh) (the YOLOv3 paper's parametrization)."""
    out = out.astype(jnp.float32)
    h, w = out.shape[1:3]
    cy = (jnp.arange(h, dtype=jnp.float32)[:, None, None] + jax.nn.sigmoid(out[..., 1])) * stride
    cx = (jnp.arange(w, dtype=jnp.float32)[None, :, None] + jax.nn.sigmoid(out[..., 0])) * stride
    anchors = jnp.asarray(anchors, jnp.float32)  # (3, 2): w, h
    bw = anchors[:, 0] * jnp.exp(jnp.minimum(out[..., 2], MAX_LOG_SCALE))
    bh = anchors[:, 1] * jnp.exp(jnp.minimum(out[..., 3], MAX_LOG_SCALE))
    return jnp.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], axis=-1)


def _upsample2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x up-sampling (darknet ``[upsample] stride=2``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


@MODELS.register("yolov3", config=YOLOv3Config, default_image_shape=(416, 416, 3),
                 description="YOLOv3 network (Darknet-53 + 3-scale head; outputs (B, H/s, W/s, 3, 5+C) "
                             "for s = 32, 16, 8).")
def build_yolov3(cfg: YOLOv3Config, *, data: DataInfo, rngs: nnx.Rngs) -> YOLOv3:
    return YOLOv3(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)
