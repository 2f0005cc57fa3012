"""ViT logits with cuDNN fused attention against the plain XLA path, on the GPU (bf16 and fp32 inputs).

    python benchmarks/attention_check.py   # prints the max |difference| of the logits
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.plugins import load_plugins
from prism.framework.registry import MODELS


def logits(model, images, mode: str) -> np.ndarray:
    os.environ["PRISM_ATTENTION"] = mode
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))  # a new function: traced again for this mode
    return np.asarray(forward(state, images).astype(jnp.float32))


if __name__ == "__main__":
    load_plugins()
    model = MODELS.build("vit_b16", None, data=DataInfo(1000, (224, 224, 3)), rngs=nnx.Rngs(0))
    model.eval()
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "dtype") and hasattr(m, "param_dtype"):
            m.dtype = jnp.bfloat16
    images = jax.random.normal(jax.random.key(1), (8, 224, 224, 3), jnp.bfloat16)
    fused, plain = logits(model, images, "auto"), logits(model, images, "xla")
    scale = float(np.abs(plain).max())
    print(f"vit_b16 bf16 logits: max |cudnn - xla| = {np.abs(fused - plain).max():.4g} (max |logit| {scale:.3g}); "
          f"top-1 agreement {np.mean(fused.argmax(-1) == plain.argmax(-1)):.3f}")
