"""airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024): the network of
``airbench/lib_airbench94.py`` (airbench 0.1.8), in NHWC.

    whiten: 2x2 conv, 3 -> 24 channels, no padding, bias; its kernel is fitted to the training images
            (:meth:`Airbench94.fit_to_data`) and never trained
    GELU
    3 blocks (widths 64, 256, 256): 3x3 conv (no bias) -> 2x2 max-pool -> BN -> GELU -> 3x3 conv -> BN -> GELU
    global max-pool (airbench's MaxPool2d(3) on the 3x3 map of a 32x32 input) -> linear (no bias) -> x 1/9

BatchNorm as airbench's: no trainable scale (torch's weight is frozen at 1), trainable bias, eps 1e-12, running
statistics ``0.6 * old + 0.4 * batch``. Convs start as PyTorch's default init with the first ``in_channels``
filters replaced by the identity (``dirac_``), as airbench's ``Conv.reset_parameters``.

The whitening kernel is a :class:`Frozen` variable, not an ``nnx.Param``: it gets no gradient, no optimizer
update and no weight decay, and is not counted as a parameter. Its bias is an ``nnx.Param``; airbench trains it
for the first 3 epochs only (``optimizer.freeze_after={whiten.bias: ...}`` does that here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.layers import BatchNorm
from prism.framework.registry import MODELS
from prism.plugins.models._layers import conv, max_pool, num_classes_of, torch_default


@dataclass
class Airbench94Config:
    """airbench94's network (``hyp['net']`` of airbench 0.1.8).

    widths: output channels of the three conv blocks (airbench: 64, 256, 256).
    batchnorm_momentum: flax convention, running = momentum * running + (1 - momentum) * batch (airbench's
        0.6, which is PyTorch momentum 0.4).
    batchnorm_eps: added to the batch variance (airbench: 1e-12).
    scaling_factor: the logits are multiplied by it (airbench: 1/9).
    whiten_kernel_size: the whitening conv's kernel size k; it has 2 * channels * k * k filters.
    whiten_eps: added to the patch-covariance eigenvalues before the whitening divides by their root.
    num_classes: 0 means the dataset's number of classes.
    """

    widths: list[int] = field(default_factory=lambda: [64, 256, 256], metadata={"ge": 1})
    batchnorm_momentum: float = field(default=0.6, metadata={"ge": 0, "lt": 1})
    batchnorm_eps: float = field(default=1e-12, metadata={"gt": 0})
    scaling_factor: float = field(default=1 / 9, metadata={"gt": 0})
    whiten_kernel_size: int = field(default=2, metadata={"ge": 1})
    whiten_eps: float = field(default=5e-4, metadata={"gt": 0})
    num_classes: int = field(default=0, metadata={"ge": 0})


class Frozen(nnx.Variable):
    """A model weight that is set, not trained (airbench's whitening kernel). Not an ``nnx.Param``: no
    gradient, no optimizer update, no weight decay; the trainer carries it in ``TrainState.rest``."""


def dirac_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's default conv init with the first ``min(in, out)`` filters set to the identity (a 1 at the
    kernel centre ``k // 2`` on their own channel): ``dirac_(w[:w.size(1)])`` on an HWIO kernel."""
    kh, kw, cin, cout = shape
    w = torch_default(key, shape, dtype)
    n = min(cin, cout)
    ident = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2, jnp.arange(n), jnp.arange(n)].set(1)
    return w.at[..., :n].set(ident)


def patch_second_moment(images: np.ndarray, kernel_size: int, chunk: int = 256) -> np.ndarray:
    """``P.T @ P / len(P)`` (float64) for the rows ``P`` of every ``k x k`` patch (stride 1, no padding) of NHWC
    float ``images``, flattened in HWIO kernel order (row, column, channel), as airbench's ``get_patches``
    (uncentred: the images are already normalized)."""
    k = kernel_size
    c = images.shape[-1]
    total, count = np.zeros((k * k * c, k * k * c)), 0
    for i in range(0, len(images), chunk):
        x = np.asarray(images[i:i + chunk], np.float64)
        windows = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))  # (n, h', w', c, k, k)
        rows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * c)
        total += rows.T @ rows
        count += len(rows)
    return total / count


def whitening_kernel(second_moment: np.ndarray, kernel_size: int, channels: int, eps: float) -> np.ndarray:
    """airbench's whitening filters (HWIO, ``2 * k * k * channels`` outputs): the eigenvectors of the patch
    second moment, largest eigenvalue first, each divided by ``sqrt(eigenvalue + eps)``, then the same filters
    negated (so a GELU after the conv keeps both signs of every whitened component)."""
    eigenvalues, eigenvectors = np.linalg.eigh(second_moment)  # ascending
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / np.sqrt(eigenvalues + eps)  # column j: filter j
    kernel = filters.reshape(kernel_size, kernel_size, channels, -1)
    return np.concatenate([kernel, -kernel], axis=-1)


class ConvGroup(nnx.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (airbench's ``ConvGroup``)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: Airbench94Config, *, rngs: nnx.Rngs):
        def norm(ch: int) -> BatchNorm:
            return BatchNorm(ch, momentum=cfg.batchnorm_momentum, epsilon=cfg.batchnorm_eps, use_scale=False,
                             rngs=rngs)

        self.conv1 = conv(in_ch, out_ch, 3, padding=1, kernel_init=dirac_init, rngs=rngs)
        self.norm1 = norm(out_ch)
        self.conv2 = conv(out_ch, out_ch, 3, padding=1, kernel_init=dirac_init, rngs=rngs)
        self.norm2 = norm(out_ch)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.gelu(self.norm1(max_pool(self.conv1(x), 2, 2)), approximate=False)
        return nnx.gelu(self.norm2(self.conv2(x)), approximate=False)


class Airbench94(nnx.Module):
    """whiten -> GELU -> 3 conv groups -> global max-pool (``features``) -> linear ``head`` -> x scaling_factor."""

    def __init__(self, cfg: Airbench94Config, in_channels: int, num_classes: int, *, rngs: nnx.Rngs,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        if len(cfg.widths) != 3 or any(w < 1 for w in cfg.widths):
            raise ConfigError(f"model.widths must be three positive channel counts (airbench94), got {cfg.widths}")
        k = cfg.whiten_kernel_size
        self.whiten_eps = cfg.whiten_eps
        self.scaling_factor = cfg.scaling_factor
        # The normalization the trainer applies before the model, which fit_to_data must apply too.
        self.input_mean = None if mean is None else tuple(float(m) for m in mean)
        self.input_std = None if std is None else tuple(float(s) for s in std)
        self.whiten = conv(in_channels, 2 * in_channels * k * k, k, padding=0, bias=True, kernel_init=dirac_init,
                           rngs=rngs)
        self.whiten.kernel = Frozen(self.whiten.kernel[...])
        blocks, channels = [], self.whiten.out_features
        for width in cfg.widths:
            blocks.append(ConvGroup(channels, width, cfg, rngs=rngs))
            channels = width
        self.blocks = nnx.List(blocks)
        self.num_features = channels
        self.head = nnx.Linear(channels, num_classes, use_bias=False, kernel_init=torch_default, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Globally max-pooled output of the last block, shape (batch, num_features)."""
        x = nnx.gelu(self.whiten(x), approximate=False)
        for block in self.blocks:
            x = block(x)
        return x.max(axis=(1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x)) * self.scaling_factor

    def fit_to_data(self, images: np.ndarray) -> None:
        """Set the whitening conv from training images (uint8 NHWC, e.g. the first 5000): its kernel to
        :func:`whitening_kernel` of their normalized ``k x k`` patches, its bias to 0 (airbench's
        ``init_whitening_conv``, which leaves the bias at its zero init). The images are scaled to [0, 1] and
        normalized with the dataset's mean/std, as the trainer does before calling the model."""
        images = np.asarray(images)
        k, c = self.whiten.kernel_size[0], self.whiten.in_features
        if images.ndim != 4 or images.shape[-1] != c or min(images.shape[1:3]) < k:
            raise ValueError(f"fit_to_data wants uint8 images of shape (n, h, w, {c}) with h, w >= {k}, got "
                             f"{images.shape}")
        x = images.astype(np.float32) / 255.0 if np.issubdtype(images.dtype, np.integer) else images.astype(np.float32)
        if self.input_mean is not None and self.input_std is not None:
            x = (x - np.asarray(self.input_mean, np.float32)) / np.asarray(self.input_std, np.float32)
        kernel = whitening_kernel(patch_second_moment(x, k), k, c, self.whiten_eps)
        self.whiten.kernel[...] = jnp.asarray(kernel, self.whiten.kernel[...].dtype)
        self.whiten.bias[...] = jnp.zeros_like(self.whiten.bias[...])


@MODELS.register("airbench94", config=Airbench94Config, default_image_shape=(32, 32, 3),
                 description="airbench94: whitened 2x2 stem + 3 conv-BN-GELU groups, for fast CIFAR-10.")
def build_airbench94(cfg: Airbench94Config, *, data: DataInfo, rngs: nnx.Rngs) -> Airbench94:
    return Airbench94(cfg, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs,
                      mean=data.mean, std=data.std)
