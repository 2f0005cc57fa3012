"""FLOPs of a JAX function from its jaxpr: convolutions and matrix products, the usual MFU numerator.

XLA's cost analysis depends on the backend: on GPU the optimized module hides convolutions inside cuDNN
custom calls and reports a fraction of the real work. Counting the ``conv_general_dilated`` and
``dot_general`` equations of the traced program (forward and backward alike, since ``jax.grad`` emits
them as ordinary equations) gives the same number on every backend. A multiply-add counts as 2 FLOPs;
elementwise work (normalization, activations, the optimizer) is not counted, as in the MFU literature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def _conv_flops(eqn) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    dims = eqn.params["dimension_numbers"]
    rhs_spec = dims.rhs_spec  # (out feature dim, in feature dim, *spatial dims) of the kernel
    in_features = rhs.shape[rhs_spec[1]]
    window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
    return 2 * math.prod(out.shape) * in_features * window  # in_features is already per group


def _dot_flops(eqn) -> int:
    lhs = eqn.invars[0].aval
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval
    return 2 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def jaxpr_flops(jaxpr: Any) -> int:
    """Convolution + matmul FLOPs of a (closed) jaxpr, recursing into nested jaxprs (jit, custom_vjp,
    remat, cond: the most expensive branch, scan: times its length)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b) for b in eqn.params["branches"])
        else:
            inner = [p for p in eqn.params.values() if isinstance(p, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
            scale = eqn.params.get("length", 1) if name == "scan" else 1
            total += scale * sum(jaxpr_flops(j) for j in inner)
    return total


def function_flops(fn: Callable, *args: Any) -> int:
    """Convolution + matmul FLOPs of one call ``fn(*args)`` (traced abstractly, nothing runs)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))
