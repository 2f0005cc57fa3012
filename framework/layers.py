"""Layers whose behaviour depends on how the trainer runs them, for plugins to build models from.

:class:`BatchNorm` is flax's ``nnx.BatchNorm`` that can take its batch statistics per data shard instead of
over the whole global batch. Inside prism's ``jax.jit`` step the batch is one global array sharded over the
devices, so a plain BatchNorm reduces over every device: XLA inserts an all-reduce per BatchNorm layer in
the forward pass and another in the backward pass, each on the critical path (SyncBN). With
``parallel.batch_stats=per_device`` the trainer sets :attr:`BatchNorm.stat_groups` to the number of data
shards; the layer then reshapes the batch to ``(groups, batch // groups, ...)`` and reduces within each
group. Each group is exactly one device's contiguous shard, so the reductions stay on the device (PyTorch
DDP's default BatchNorm, Goyal et al. 2017's per-worker statistics). The running statistics are the mean over
the groups, updated once per step (their all-reduce is off the critical path and XLA combines it with the
gradients').

Why not flax's own option: ``nnx.BatchNorm(axis_index_groups=...)`` groups devices only inside
``shard_map``/``pmap`` (its docstring: not supported for SPMD jit), and prism's step is SPMD jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (same arguments, parameters and state) with optional per-group batch statistics.

    stat_groups: 1 (default) normalizes with the statistics of the whole batch, exactly as
        ``nnx.BatchNorm``; ``g > 1`` splits the batch axis into ``g`` equal contiguous groups and normalizes
        each with its own mean and variance (set by the trainer from ``parallel.batch_stats``; any value
        dividing the batch works, e.g. for ghost batch normalization).
    """

    stat_groups: int = 1

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        running = self.use_running_average if use_running_average is None else use_running_average
        groups = self.stat_groups
        if running or groups <= 1 or mask is not None or self.axis_name is not None:
            return super().__call__(x, use_running_average, mask=mask)
        feature_axis = self.axis % x.ndim
        if feature_axis == 0:
            raise ValueError("BatchNorm with stat_groups needs the batch on axis 0 and the features elsewhere")
        if x.shape[0] % groups:
            raise ValueError(f"BatchNorm stat_groups={groups} does not divide the batch of {x.shape[0]}")
        grouped = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        axes = tuple(a for a in range(1, grouped.ndim) if a != feature_axis + 1)
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        values = grouped.astype(stats_dtype)
        mean = values.mean(axes, keepdims=True)
        if self.use_fast_variance:
            var = jnp.maximum(0.0, jnp.square(values).mean(axes, keepdims=True) - jnp.square(mean))
        else:
            var = jnp.square(values - mean).mean(axes, keepdims=True)
        group_mean = jax.lax.stop_gradient(mean.mean(0).reshape(-1))
        group_var = jax.lax.stop_gradient(var.mean(0).reshape(-1))
        self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * group_mean
        self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * group_var
        shape = [1] * grouped.ndim
        shape[feature_axis + 1] = x.shape[feature_axis]
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            mul = mul * self.scale[...].reshape(shape)
        y = (values - mean) * mul
        if self.bias is not None:
            y = y + self.bias[...].reshape(shape)
        dtype = self.dtype or jnp.result_type(x, *(p[...] for p in (self.scale, self.bias) if p is not None))
        return y.reshape(x.shape).astype(dtype)
