"""An example third-party ``prism`` command, found through the ``prism.commands`` entry point (see this
package's pyproject.toml): ``prism tiny-mlp-size [HIDDEN]`` builds the package's ``tiny_mlp`` model through
the registry, for 8x8 grey images and 10 classes, and prints its parameter count."""

from __future__ import annotations

import sys

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS


def tiny_mlp_size(args: list[str]) -> int:
    """Print the parameter count of tiny_mlp (an example command from prism-example-plugin)."""
    if len(args) > 1 or (args and not args[0].isdigit()):
        raise ConfigError(f"usage: prism tiny-mlp-size [HIDDEN], got {' '.join(args)!r}")
    entry = MODELS.get("tiny_mlp")
    cfg = entry.config(hidden=int(args[0])) if args else entry.default_config()
    model = MODELS.build("tiny_mlp", cfg, data=DataInfo(num_classes=10, image_shape=(8, 8, 1)), rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"tiny_mlp hidden={cfg.hidden}: {params} parameters", file=sys.stdout)
    return 0
