"""Can the model take the dataset's images? Checked when the run is built, from a trace of its forward pass.

A model and a dataset can each be valid and still not fit: AlexNet's strides reduce 8x8 digits to an empty
feature map, whose pooled features are NaN (the run stopped at step 1 blaming the learning rate); a U-Net
whose levels do not divide the image size fails inside jit with a shape error. Tracing the evaluation forward
pass on an abstract batch of the dataset's image shape (``jax.make_jaxpr``: shapes only, nothing computed or
compiled) finds both before anything runs, and the error names the model, the image shape and the problem.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.errors import ConfigError


def _first_empty(jaxpr: Any) -> tuple[str, tuple[int, ...]] | None:
    """``(primitive, shape)`` of the first value of ``jaxpr`` (or of a jaxpr nested in it) with a zero-size axis."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            if 0 in shape:
                return eqn.primitive.name, shape
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found = _first_empty(inner)
                    if found is not None:
                        return found
    return None


def check_model_fits(graphdef: Any, params: Any, rest: Any, image_shape: tuple[int, ...], model_name: str) -> None:
    """A one-line ConfigError unless the model's forward pass (``system.model(x)`` of the evaluation graph
    ``graphdef`` with the abstract ``params``/``rest``) runs on a batch of ``image_shape`` images without an
    empty intermediate value."""

    def forward(params, rest, images):
        return nnx.merge(graphdef, params, rest, copy=True).model(images)

    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    shape = "x".join(str(d) for d in image_shape)
    try:
        jaxpr = jax.make_jaxpr(forward)(params, rest, images)
    except (TypeError, ValueError, IndexError) as exc:  # shape errors while tracing: the model cannot take them
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"model {model_name!r} cannot run on this dataset's {shape} images: {type(exc).__name__}: "
                          f"{reason}; choose a model for this image size or resize the images") from None
    empty = _first_empty(jaxpr.jaxpr)
    if empty is not None:
        primitive, value_shape = empty
        raise ConfigError(f"model {model_name!r} reduces this dataset's {shape} images to an empty value (shape "
                          f"{value_shape} after {primitive}): its features would be NaN; use larger images "
                          f"(dataset.image_size) or a model for small inputs")


__all__ = ["check_model_fits"]
