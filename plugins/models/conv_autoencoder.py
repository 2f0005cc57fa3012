"""A bias-free convolutional autoencoder (``model=conv_autoencoder``): reconstruction and Deep SVDD.

After Ruff et al. 2018 (Deep SVDD, ICML; their LeNet-type networks for MNIST and CIFAR-10): every conv and
linear layer has no bias and every BatchNorm is without affine parameters, so the encoder cannot map all
inputs to a constant through bias terms (the "hypersphere collapse" their Proposition 2 rules out); the
same encoder serves the autoencoder that pre-trains it.

- encoder: per stage ``w`` of ``widths`` a ``kernel``x``kernel`` conv, BatchNorm (no affine), leaky ReLU
  (slope 0.01), 2x2 max-pool; then a linear map to ``latent_dim``: :meth:`ConvAutoencoder.features`.
- decoder: linear to the last stage's grid, then per stage (reversed) 2x nearest upsampling, conv, BatchNorm,
  leaky ReLU, and a final conv to the image's channels: :meth:`ConvAutoencoder.reconstruct` (also ``model(x)``)
  reconstructs the normalized input image.
- ``center``: Deep SVDD's hypersphere center c (a non-trainable variable, saved with the weights), set by
  ``objective=deep_svdd`` from the initial forward pass and read by ``task=anomaly task.scorer=svdd``.

The image height and width must be divisible by ``2 ** len(widths)``.
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


class SVDDCenter(nnx.Variable):
    """Deep SVDD's center c: state, not a parameter (no gradient, no optimizer update)."""


@dataclass
class ConvAutoencoderConfig:
    """widths: channels of the encoder's conv stages (the decoder mirrors them); each stage halves the image.
    latent_dim: size of the code (the features Deep SVDD and kNN use).
    kernel: conv kernel size (odd; Ruff et al.'s LeNet-type networks use 5).
    """

    widths: list[int] = field(default_factory=lambda: [32, 64], metadata={"ge": 1})
    latent_dim: int = field(default=32, metadata={"ge": 1})
    kernel: int = field(default=5, metadata={"ge": 1, "le": 11})


def _leaky(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, 0.01)


class ConvAutoencoder(nnx.Module):
    def __init__(self, cfg: ConvAutoencoderConfig, image_shape: tuple[int, int, int], *, rngs: nnx.Rngs) -> None:
        height, width, channels = image_shape
        scale = 2 ** len(cfg.widths)
        if not cfg.widths or height % scale or width % scale:
            raise ConfigError(f"model.widths={list(cfg.widths)}: conv_autoencoder halves the image once per stage, "
                              f"so {height}x{width} must be divisible by 2**{len(cfg.widths)}={scale}")
        if cfg.kernel % 2 == 0:
            raise ConfigError(f"model.kernel must be odd (same padding), got {cfg.kernel}")
        k = (cfg.kernel, cfg.kernel)

        def conv(cin: int, cout: int) -> nnx.Conv:
            return nnx.Conv(cin, cout, kernel_size=k, use_bias=False, conv_general_dilated=conv_general_dilated,
                            rngs=rngs)

        def norm(c: int) -> BatchNorm:
            return BatchNorm(c, use_bias=False, use_scale=False, epsilon=1e-4, rngs=rngs)

        widths = list(cfg.widths)
        self.grid = (height // scale, width // scale, widths[-1])
        self.enc_convs = nnx.List([conv(c, w) for c, w in zip([channels, *widths[:-1]], widths, strict=True)])
        self.enc_norms = nnx.List([norm(w) for w in widths])
        self.to_latent = nnx.Linear(self.grid[0] * self.grid[1] * self.grid[2], cfg.latent_dim, use_bias=False,
                                    rngs=rngs)
        self.from_latent = nnx.Linear(cfg.latent_dim, self.grid[0] * self.grid[1] * self.grid[2], use_bias=False,
                                      rngs=rngs)
        rev = widths[::-1]
        self.dec_convs = nnx.List([conv(c, w) for c, w in zip(rev, [*rev[1:], rev[-1]], strict=True)])
        self.dec_norms = nnx.List([norm(w) for w in [*rev[1:], rev[-1]]])
        self.out_conv = conv(rev[-1], channels)
        self.num_features = cfg.latent_dim
        self.center = SVDDCenter(jnp.zeros((cfg.latent_dim,), jnp.float32))

    def features(self, x: jax.Array) -> jax.Array:
        """The code, shape (batch, latent_dim)."""
        for conv, norm in zip(self.enc_convs, self.enc_norms, strict=True):
            x = nnx.max_pool(_leaky(norm(conv(x))), window_shape=(2, 2), strides=(2, 2))
        return self.to_latent(x.reshape(x.shape[0], -1))

    def decode(self, z: jax.Array) -> jax.Array:
        x = self.from_latent(z).reshape(z.shape[0], *self.grid)
        for conv, norm in zip(self.dec_convs, self.dec_norms, strict=True):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _leaky(norm(conv(x)))
        return self.out_conv(x)

    def reconstruct(self, x: jax.Array) -> jax.Array:
        """The reconstruction of ``x`` (normalized images, NHWC), same shape."""
        return self.decode(self.features(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.reconstruct(x)


@MODELS.register("conv_autoencoder", config=ConvAutoencoderConfig,
                 description="Bias-free conv autoencoder (Ruff et al. 2018): reconstruction, Deep SVDD features.")
def build_conv_autoencoder(cfg: ConvAutoencoderConfig, *, data: DataInfo, rngs: nnx.Rngs) -> ConvAutoencoder:
    return ConvAutoencoder(cfg, tuple(data.image_shape), rngs=rngs)
