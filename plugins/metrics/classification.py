"""Per-example classification metrics (jit-able): a task averages them over the evaluation split.

Each builder returns ``fn(logits, labels) -> (batch,)`` values, so the mean over a split of any
size is exact however it is batched and padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from prism.framework.registry import METRICS


@METRICS.register("accuracy", description="1 where the arg-max class equals the label, else 0.")
def build_accuracy():
    def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return (logits.argmax(-1) == labels).astype(jnp.float32)

    return accuracy


@dataclass
class TopKConfig:
    """k: how many of the highest-scoring classes may contain the label."""

    k: int = 5


@METRICS.register("top_k_accuracy", config=TopKConfig, description="1 where the label is among the k best classes.")
def build_top_k_accuracy(cfg: TopKConfig):
    def top_k_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
        top = jax.lax.top_k(logits, cfg.k)[1]
        return (top == labels[:, None]).any(-1).astype(jnp.float32)

    return top_k_accuracy


@METRICS.register("cross_entropy", description="Softmax cross-entropy of the logits against the label.")
def build_cross_entropy():
    def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)

    return cross_entropy
