"""Elastic deformation as in the U-Net paper (Ronneberger et al. 2015, section 3.1).

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid. The
displacements are sampled from a Gaussian distribution with 10 pixels standard deviation. Per-pixel
displacements are then computed using bicubic interpolation." Here: a ``(2, grid, grid)`` array of
N(0, sigma^2) displacements (in pixels, y and x) is resized bicubically to ``(2, H, W)``
(``jax.image.resize``: grid nodes at the centres of ``grid`` equal strips), and output pixel (y, x)
samples the input at ``(y + dy, x + dx)``: the image bilinearly, the mask by nearest neighbour, both
with the same field. Points outside the image are mirrored (``mode=reflect``) by default, so borders
keep real texture and valid labels. Boxes cannot follow a non-affine warp: an example with boxes is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from prism.framework.augment import Example
from prism.framework.errors import ConfigError
from prism.framework.registry import TRANSFORMS
from prism.plugins.transforms._common import with_probability

MODES = ("reflect", "mirror", "nearest", "wrap", "constant")


@dataclass
class ElasticConfig:
    """sigma: standard deviation of the grid displacements, in pixels (of the image at this point of the
        pipeline); 0 is the identity.
    grid: number of grid nodes per side (3 in the paper).
    p: probability of deforming an example.
    mode: how points outside the image are sampled (reflect | mirror | nearest | wrap | constant: 0).
    """

    sigma: float = 10.0
    grid: int = 3
    p: float = 1.0
    mode: str = field(default="reflect", metadata={"choices": MODES})


def displacement_field(key: jax.Array, height: int, width: int, grid: int, sigma: float) -> jax.Array:
    """(2, height, width) per-pixel displacements (dy, dx): Gaussian grid values, bicubically interpolated."""
    coarse = sigma * jax.random.normal(key, (2, grid, grid), jnp.float32)
    return jax.image.resize(coarse, (2, height, width), method="cubic")


def deform(example: Example, field: jax.Array, mode: str = "reflect") -> Example:
    """Sample ``example``'s image (bilinear) and mask (nearest) at ``(y + dy, x + dx)``."""
    if "boxes" in example:
        raise ConfigError("transform 'elastic' moves images and masks but cannot move boxes; remove it from "
                          "augment.ops for detection data")
    image = example["image"]
    h, w = image.shape[:2]
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    coords = [ys + field[0], xs + field[1]]
    channels = [map_coordinates(image[..., c], coords, order=1, mode=mode, cval=0.0) for c in range(image.shape[-1])]
    out = {**example, "image": jnp.stack(channels, axis=-1).astype(image.dtype)}
    if "mask" in example:
        out["mask"] = map_coordinates(example["mask"], coords, order=0, mode=mode, cval=0).astype(
            example["mask"].dtype)
    return out


@TRANSFORMS.register("elastic", config=ElasticConfig,
                     description="U-Net elastic deformation: Gaussian displacements on a coarse grid, bicubically "
                                 "interpolated; mask follows (nearest).")
def build_elastic(cfg: ElasticConfig):
    if cfg.sigma < 0 or cfg.grid < 2:
        raise ConfigError(f"elastic: sigma must be >= 0 and grid >= 2, got sigma={cfg.sigma}, grid={cfg.grid}")
    if cfg.mode not in MODES:
        raise ConfigError(f"elastic: mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")

    def elastic(example: Example, key: jax.Array) -> Example:
        h, w = example["image"].shape[:2]
        return deform(example, displacement_field(key, h, w, cfg.grid, cfg.sigma), cfg.mode)

    return with_probability(cfg.p, elastic)
