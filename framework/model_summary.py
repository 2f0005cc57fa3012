"""Size and cost of a registered model: parameter count and forward GFLOPs from XLA's cost analysis.

Nothing is allocated: the model is built abstractly (``nnx.eval_shape``) and its forward pass is lowered and
compiled for shapes only, so ``model_summary("vit_b16")`` is cheap even on a laptop.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from framework.api import DataInfo
from framework.registry import MODELS

DEFAULT_IMAGE_SHAPE = (224, 224, 3)


def count_params(module: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``); BatchNorm running statistics are not counted."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def default_image_shape(name: str) -> tuple[int, int, int]:
    """The input shape a model is summarised at: its registry metadata ``default_image_shape``, else 224x224x3."""
    return tuple(MODELS.get(name).metadata.get("default_image_shape", DEFAULT_IMAGE_SHAPE))


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        return sum(_flops(c) for c in cost)
    return float((cost or {}).get("flops", 0.0))


def model_summary(name: str, image_shape: tuple[int, int, int] | None = None, num_classes: int = 1000,
                  cfg: Any = None) -> dict[str, Any]:
    """``{"params": int, "gflops": float}`` of model ``name`` (default config unless ``cfg``).

    ``params`` counts ``nnx.Param`` leaves for ``num_classes`` classes and ``image_shape`` (H, W, C) inputs
    (default: the entry's ``default_image_shape`` metadata, else 224x224x3). ``gflops`` is XLA's
    cost-analysis ``flops`` of one eval-mode forward pass at batch 1, divided by 1e9 (a multiply-add counts
    as 2 FLOPs; XLA does not count taps that fall on convolution padding, so conv nets come out a few
    percent below the usual 2 x MACs figures, e.g. ResNet-18 at 224: 3.37 vs 3.63); 0.0 when the backend
    reports no cost analysis.
    """
    shape = tuple(image_shape) if image_shape is not None else default_image_shape(name)
    data = DataInfo(num_classes=num_classes, image_shape=shape)
    model = nnx.eval_shape(lambda: MODELS.build(name, cfg, data=data, rngs=nnx.Rngs(0)))
    params = count_params(model)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    images = jax.ShapeDtypeStruct((1, *shape), jax.numpy.float32)
    lowered = jax.jit(forward).lower(state, images)
    flops = _flops(lowered.cost_analysis())  # HLO-level analysis: same count as the compiled one, no compile
    if not flops:
        flops = _flops(lowered.compile().cost_analysis())
    return {"params": params, "gflops": flops / 1e9}
