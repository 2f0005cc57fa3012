"""PyTorch -> flax NNX weight conversion by layer type: the generic part of every model's converter.

A model's converter (registered as its ``torch_weights`` metadata, see :mod:`prism.framework.pretrained`) only
says which of its modules corresponds to which torch module name::

    rules = TorchRules(model)
    rules.add("stages.0.0.conv1", "layer1.0.conv1")
    return rules.rules

and :meth:`TorchRules.add` derives the tensors from the module's type: ``nnx.Conv`` kernel HWIO from torch
OIHW (grouped and depthwise convs alike), ``nnx.Linear`` kernel = weight transposed, ``nnx.BatchNorm``
scale/bias/mean/var from weight/bias/running_mean/running_var, ``nnx.LayerNorm`` scale/bias from weight/bias,
a bare variable (ViT's ``cls_token``) as it is. Private module: imported by the model plugins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flax import nnx

from prism.framework.pretrained import TensorRule


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _resolve(model: nnx.Module, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in / groups, kh, kw) -> flax kernel (kh, kw, in / groups, out)."""
    return w.transpose(2, 3, 1, 0)


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out)."""
    return w.T


def nchw_flatten_linear(channels: int, height: int, width: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear weight fed by an NCHW-flattened map -> flax kernel fed by our NHWC-flattened map.

    Row ``c * H * W + h * W + w`` of torch's input becomes row ``(h * W + w) * C + c`` (AlexNet's and VGG's
    first classifier layer after the adaptive pool).
    """

    def transform(w: np.ndarray) -> np.ndarray:
        out = w.shape[0]
        return w.reshape(out, channels, height, width).transpose(2, 3, 1, 0).reshape(height * width * channels, out)

    return transform


class TorchRules:
    """Collects the :class:`TensorRule` list of one model, module by module."""

    def __init__(self, model: nnx.Module) -> None:
        self.model = model
        self.rules: list[TensorRule] = []

    def _rule(self, target: str, source: str, shape: tuple[int, ...], transform=None) -> None:
        self.rules.append(TensorRule(target, source, shape, transform))

    def add(self, ours: str, theirs: str, *, kernel_transform: Callable[[np.ndarray], np.ndarray] | None = None
            ) -> TorchRules:
        """Map module ``ours`` (a path in the model, ``"stages.0.1.conv1"``) to torch module ``theirs``.

        ``kernel_transform`` replaces the default kernel conversion of a Linear (AlexNet/VGG's first FC layer).
        """
        module = _resolve(self.model, ours)
        if isinstance(module, nnx.Conv):
            kh, kw, cin, cout = _shape(module.kernel)
            self._rule(f"{ours}.kernel", f"{theirs}.weight", (cout, cin, kh, kw), conv_kernel)
            if module.bias is not None:
                self._rule(f"{ours}.bias", f"{theirs}.bias", _shape(module.bias))
        elif isinstance(module, nnx.Linear):
            cin, cout = _shape(module.kernel)
            self._rule(f"{ours}.kernel", f"{theirs}.weight", (cout, cin), kernel_transform or linear_kernel)
            if module.bias is not None:
                self._rule(f"{ours}.bias", f"{theirs}.bias", _shape(module.bias))
        elif isinstance(module, nnx.BatchNorm):
            for mine, torch_name in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                                     ("var", "running_var")):
                if getattr(module, mine, None) is not None:
                    self._rule(f"{ours}.{mine}", f"{theirs}.{torch_name}", _shape(getattr(module, mine)))
        elif isinstance(module, nnx.LayerNorm):
            for mine, torch_name in (("scale", "weight"), ("bias", "bias")):
                if getattr(module, mine, None) is not None:
                    self._rule(f"{ours}.{mine}", f"{theirs}.{torch_name}", _shape(getattr(module, mine)))
        elif isinstance(module, nnx.Variable):
            self._rule(ours, theirs, _shape(module))
        else:
            raise TypeError(f"no PyTorch conversion for {ours!r} of type {type(module).__name__}")
        return self
