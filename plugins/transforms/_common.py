"""Helpers shared by the built-in transforms (private: not a plugin module)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from prism.framework.augment import Example


def with_probability(p: float, fn: Callable[[Example, jax.Array], Example]) -> Callable[[Example, jax.Array], Example]:
    """Apply ``fn`` with probability ``p`` (both branches are computed; jnp.where picks, vmap-friendly)."""

    def apply(example: Example, key: jax.Array) -> Example:
        if p >= 1.0:
            return fn(example, key)
        if p <= 0.0:
            return example
        coin_key, fn_key = jax.random.split(key)
        coin = jax.random.uniform(coin_key) < p
        changed = fn(example, fn_key)
        return {k: jnp.where(coin, changed[k], v) if k in changed else v for k, v in example.items()}

    return apply


def pair(value, name: str) -> tuple[float, float]:
    """A (low, high) range from a 2-list, checked."""
    if len(value) != 2 or value[0] > value[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")
    return float(value[0]), float(value[1])


def size_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"size must be an int or [height, width], got {list(size)}")
    return int(size[0]), int(size[1])
