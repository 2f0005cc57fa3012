"""Attention rollout (Abnar & Zuidema 2020): each layer's attention, heads fused (mean, max or min), plus the
identity for the residual connection, rows renormalized, ``A_l = 0.5 W_l + 0.5 I``; multiplied through the layers,
``R = A_L ... A_1``. The map is the class token's row over the patch tokens, on the patch grid. Optionally the
lowest ``discard_ratio`` of each fused attention matrix is zeroed first (the class token's column kept), as in
jacobgil's vit-explain."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import AttentionModel, Explainer, InputSpace
from prism.framework.registry import EXPLAINERS
from prism.framework.taps import captured

HEAD_FUSIONS = ("mean", "max", "min")


@dataclass
class RolloutConfig:
    """head_fusion: how each layer's heads are combined: 'mean', 'max' or 'min'.
    discard_ratio: share of each fused attention matrix's smallest weights set to 0 before the rollout (0: none).
    """

    head_fusion: str = field(default="mean", metadata={"choices": HEAD_FUSIONS})
    discard_ratio: float = field(default=0.0, metadata={"ge": 0, "lt": 1})


def attention_rollout(weights: Sequence[jax.Array], head_fusion: str = "mean", discard_ratio: float = 0.0
                      ) -> jax.Array:
    """The rollout (batch, tokens, tokens) of per-layer attention weights, each (batch, heads, tokens, tokens)."""
    fuse = {"mean": jnp.mean, "max": jnp.max, "min": jnp.min}[head_fusion]
    result = None
    for w in weights:
        a = fuse(w.astype(jnp.float32), axis=1)
        b, n, _ = a.shape
        if discard_ratio > 0:
            flat = a.reshape(b, -1)
            drop = int(flat.shape[1] * discard_ratio)
            order = jnp.argsort(flat, axis=1)[:, :drop]
            keep = jnp.ones_like(flat).at[jnp.arange(b)[:, None], order].set(0.0).reshape(b, n, n)
            keep = keep.at[:, :, 0].set(1.0)  # the class token's column is never discarded
            a = a * keep
        a = 0.5 * a + 0.5 * jnp.eye(n, dtype=a.dtype)
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else a @ result
    return result


def patch_grid(tokens: int, height: int, width: int) -> tuple[int, int, int]:
    """``(extra, h, w)``: the fewest leading extra tokens leaving ``h * w`` patch tokens on a grid with the image's
    aspect ratio ``height / width``."""
    for extra in range(tokens):
        t = tokens - extra
        h = round(math.sqrt(t * height / width))
        if h >= 1 and t % h == 0 and h * width == (t // h) * height:
            return extra, h, t // h
    raise ValueError(f"{tokens} tokens hold no patch grid of a {height}x{width} image")


class Rollout(Explainer):
    model_contract = AttentionModel

    def __init__(self, cfg: RolloutConfig) -> None:
        self.cfg = cfg

    def explain(self, model: nnx.Module, score: Callable[[jax.Array], jax.Array], images: jax.Array, *,
                layer: str | None, key: jax.Array, space: InputSpace) -> jax.Array:
        names = tuple(model.attention_layers)
        _, seen = captured(lambda: score(images), names)
        rollout = attention_rollout([seen[n] for n in names], self.cfg.head_fusion, self.cfg.discard_ratio)
        extra, h, w = patch_grid(rollout.shape[-1], *images.shape[1:3])
        return rollout[:, 0, extra:].reshape(-1, h, w)

    def describe(self) -> dict:
        return {"head_fusion": self.cfg.head_fusion, "discard_ratio": self.cfg.discard_ratio}


@EXPLAINERS.register("rollout", config=RolloutConfig,
                     description="Attention rollout (ViT): attention plus identity multiplied through the layers.")
def build_rollout(cfg: RolloutConfig) -> Rollout:
    return Rollout(cfg)
