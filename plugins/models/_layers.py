"""Building blocks shared by the model plugins: PyTorch-style conv/BN factories, initializers matching
torchvision's, and adaptive average pooling. Private module (not imported by plugin discovery on its
own; the model modules import it).

Layouts are NHWC (flax); torchvision's ``padding=p`` becomes explicit symmetric padding ``((p, p), (p, p))``
so that output sizes match PyTorch's for every input size (flax's ``"SAME"`` pads asymmetrically for
strided convs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.conv import conv_general_dilated
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm

#: torchvision BatchNorm defaults: eps 1e-5, PyTorch momentum 0.1 = flax momentum 0.9.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9

#: ``kaiming_normal_(mode="fan_out", nonlinearity="relu")`` (torchvision ResNet/VGG/MobileNetV2 convs).
kaiming_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
#: ``kaiming_normal_()`` with its default fan_in mode (torchvision DenseNet convs).
kaiming_normal_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
#: PyTorch's default weight init for Conv/Linear: ``kaiming_uniform_(a=sqrt(5))`` = U(+-1/sqrt(fan_in)).
torch_default = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros = nnx.initializers.zeros_init()
ones = nnx.initializers.ones_init()


def num_classes_of(cfg_num_classes: int, data: DataInfo) -> int:
    """The config's number of classes, or the dataset's when the config says 0."""
    n = cfg_num_classes or data.num_classes
    if n <= 0:
        raise ConfigError(f"model.num_classes must be positive (config {cfg_num_classes}, dataset {data.num_classes})")
    return n


#: How a model's first (stem) conv is computed, its ``stem_conv`` config field: see :class:`SpaceToDepthConv`.
STEM_CONVS = ("space_to_depth", "direct")


def check_stem_conv(value: str, model: str) -> bool:
    """``True`` for ``"space_to_depth"``, ``False`` for ``"direct"``; a clear error for anything else."""
    if value not in STEM_CONVS:
        raise ConfigError(f"model.stem_conv must be one of {STEM_CONVS} ({model}), got {value!r}")
    return value == "space_to_depth"


def conv(in_ch: int, out_ch: int, kernel: int, *, rngs: nnx.Rngs, stride: int = 1, padding: int | None = None,
         groups: int = 1, bias: bool = False, kernel_init=kaiming_normal_fan_out, bias_init=zeros,
         space_to_depth: bool = False) -> nnx.Conv:
    """A square conv with PyTorch semantics: symmetric ``padding`` (default ``kernel // 2``), ``groups``.

    It computes through :func:`prism.framework.conv.conv_general_dilated` (on CPU, a matmul weight gradient);
    with ``space_to_depth`` (strided convs only) it is a :class:`SpaceToDepthConv`."""
    p = kernel // 2 if padding is None else padding
    layer = SpaceToDepthConv if space_to_depth else nnx.Conv
    return layer(in_ch, out_ch, kernel_size=(kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 feature_group_count=groups, use_bias=bias, kernel_init=kernel_init, bias_init=bias_init,
                 conv_general_dilated=conv_general_dilated, rngs=rngs)


def batch_norm(channels: int, *, rngs: nnx.Rngs, zero_init: bool = False) -> BatchNorm:
    """BatchNorm with torchvision's eps/momentum; ``zero_init`` starts gamma at 0 (residual branches).

    :class:`prism.framework.layers.BatchNorm`, so that ``parallel.batch_stats=per_device`` applies to it."""
    return BatchNorm(channels, momentum=BN_MOMENTUM, epsilon=BN_EPS, scale_init=zeros if zero_init else ones,
                         rngs=rngs)


def linear(in_f: int, out_f: int, *, rngs: nnx.Rngs, kernel_init=torch_default, bias_init=zeros) -> nnx.Linear:
    return nnx.Linear(in_f, out_f, kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)


def space_to_depth_conv(layer: nnx.Conv, x: jax.Array) -> jax.Array:
    """``layer(x)`` for a square strided conv (explicit padding, no groups or dilation), computed as a
    stride-1 conv on the space-to-depth rearranged input.

    Each ``s x s`` block of input pixels (``s`` the stride) becomes one pixel with ``s * s`` times the
    channels, and the kernel, zero-padded to a multiple of ``s`` taps, is rearranged the same way: a 7x7
    stride-2 conv on 224x224x3 becomes a 4x4 stride-1 conv on 115x115x12. The same function of the same
    parameters (torchvision weights load unchanged), up to float summation order; GPUs run the stride-1,
    12-channel form better than a strided conv whose 3 input channels tensor cores must pad (MLPerf's
    ResNet-50 stems do the same).
    """
    if layer.feature_group_count != 1 or any(d not in (None, 1, (1, 1)) for d in
                                            (layer.input_dilation, layer.kernel_dilation)):
        raise ValueError("space_to_depth_conv needs a conv without groups or dilation")
    strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (layer.strides,) * 2
    if isinstance(layer.padding, str) or len(set(strides)) != 1 or len(set(layer.kernel_size)) != 1:
        raise ValueError(f"space_to_depth_conv needs a square kernel, one stride and explicit padding; got "
                         f"kernel {layer.kernel_size}, strides {layer.strides}, padding {layer.padding!r}")
    (s,), (k,) = set(strides), set(layer.kernel_size)
    kernel = layer.kernel[...]
    bias = layer.bias[...] if layer.bias is not None else None
    x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, kernel, bias), dtype=layer.dtype)
    n, h, w, c = x.shape
    taps = -(-k // s)  # kernel taps per axis after the rearrangement
    kernel = jnp.pad(kernel, ((0, taps * s - k), (0, taps * s - k), (0, 0), (0, 0)))
    kernel = kernel.reshape(taps, s, taps, s, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(taps, taps, s * s * c, -1)
    pads = []
    for size, (low, high) in zip((h, w), layer.padding, strict=True):
        out = (size + low + high - k) // s + 1
        pads.append((low, s * (out + taps - 1) - size - low, 0))  # the rows the outputs read (may crop)
    x = jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
    _, hp, wp, _ = x.shape
    x = x.reshape(n, hp // s, s, wp // s, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hp // s, wp // s, s * s * c)
    y = conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                             precision=layer.precision)
    return y if bias is None else y + bias


class SpaceToDepthConv(nnx.Conv):
    """``nnx.Conv`` (same arguments and parameters) computed by :func:`space_to_depth_conv`: for the strided
    stem convs of image models, whose 3 input channels tensor cores handle badly."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        return space_to_depth_conv(self, inputs)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """PyTorch ``MaxPool2d(kernel, stride, padding)`` (floor mode; padding counts as -inf).

    XLA's ``reduce_window`` (its gradient a ``select_and_scatter``). Tried and measured on an H100 ResNet-50
    step: the maximum of the ``kernel**2`` strided slices, whose gradient is a fusable chain of selects, was
    no faster (benchmarks/RESULTS.md)."""
    return nnx.max_pool(x, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)))


def avg_pool(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """PyTorch ``AvgPool2d(kernel, stride)`` without padding (floor mode)."""
    return nnx.avg_pool(x, (kernel, kernel), (stride, stride))


def _adaptive_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging weights of PyTorch's adaptive pooling: bin i covers
    ``[floor(i * in / out), ceil((i + 1) * in / out))``; bins overlap or repeat when sizes don't divide."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """PyTorch ``AdaptiveAvgPool2d(output_size)`` on NHWC input of any spatial size (exact bins)."""
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    h, w = x.shape[1], x.shape[2]
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # equal, non-overlapping bins: a reshape-mean
        return x.reshape(x.shape[0], oh, h // oh, ow, w // ow, x.shape[3]).mean(axis=(2, 4))
    mh = jnp.asarray(_adaptive_matrix(h, oh), x.dtype)
    mw = jnp.asarray(_adaptive_matrix(w, ow), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", mh, x, mw)

