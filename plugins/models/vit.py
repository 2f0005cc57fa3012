"""Vision Transformers ViT-Ti/S/B (Dosovitskiy et al. 2021) in timm's ``vit_*_patch16_224`` layout:
patch conv, class token, learned position embedding, pre-norm blocks (qkv bias), final LayerNorm, head."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.conv import conv_general_dilated
from prism.framework.errors import ConfigError
from prism.framework.registry import MODELS
from prism.framework.taps import tap, tap_grid_tokens, wanted
from prism.plugins.models._layers import num_classes_of, torch_default, zeros
from prism.plugins.models._torch_import import TorchRules

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon
_trunc_normal = nnx.initializers.truncated_normal(0.02)  # timm's Linear / pos-embed init (std 0.02)


@dataclass
class ViTConfig:
    """Vision Transformer with a class token.

    patch_size: side of the square patches (16).
    image_size: side of the square images the position embedding is made for; 0 means the dataset's
        image height. Other input sizes work: the embedding is resized bicubically (timm's dynamic size).
    embed_dim: token width (192 Ti, 384 S, 768 B).
    depth: number of transformer blocks (12).
    num_heads: attention heads (3 Ti, 6 S, 12 B).
    mlp_ratio: MLP hidden width / embed_dim (4).
    qkv_bias: bias in the fused qkv projection (True, as timm).
    dropout: dropout after the position embedding and in the MLP/projection (0).
    attention_dropout: dropout on attention weights (0).
    drop_path: stochastic depth rate, increasing linearly from 0 to this over the blocks (0).
    num_classes: 0 means the dataset's number of classes.
    """

    patch_size: int = field(default=16, metadata={"ge": 1})
    image_size: int = field(default=0, metadata={"ge": 0})
    embed_dim: int = field(default=768, metadata={"ge": 1})
    depth: int = field(default=12, metadata={"ge": 1})
    num_heads: int = field(default=12, metadata={"ge": 1})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0})
    qkv_bias: bool = True
    dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    attention_dropout: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    drop_path: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    num_classes: int = field(default=0, metadata={"ge": 0})


def _linear(i: int, o: int, *, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(i, o, use_bias=bias, kernel_init=_trunc_normal, bias_init=zeros, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention``); its softmax weights are tapped as
    ``tap_name`` (:mod:`prism.framework.taps`; the fused cuDNN kernel is skipped while they are collected)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float, *, rngs: nnx.Rngs,
                 tap_name: str = "attn"):
        if dim % heads:
            raise ConfigError(f"model.embed_dim {dim} is not divisible by model.num_heads {heads}")
        self.heads = heads
        self.tap_name = tap_name
        self.qkv = _linear(dim, 3 * dim, bias=qkv_bias, rngs=rngs)
        self.attn_drop = nnx.Dropout(attn_drop, rngs=rngs)
        self.proj = _linear(dim, dim, rngs=rngs)
        self.proj_drop = nnx.Dropout(proj_drop, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads), 2, 0)
        scale = 1.0 / math.sqrt(d // self.heads)
        dropout_active = self.attn_drop.rate > 0 and not self.attn_drop.deterministic
        if _use_cudnn_attention(q, dropout_active) and not wanted(self.tap_name):
            out = _cudnn_attention(q, k, v, scale)
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
            weights = tap(self.tap_name, jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype))
            out = jnp.einsum("bhqk,bkhd->bqhd", self.attn_drop(weights), v)
        return self.proj_drop(self.proj(out.reshape(b, n, d)))


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """cuDNN flash attention over (batch, tokens, heads, dim); cuDNN trains only on token counts that are a
    multiple of its tile, so 197 tokens are padded to 200 and the padding is masked out by sequence length."""
    b, n = q.shape[:2]
    pad = (-n) % 8
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    lengths = jnp.full((b,), n, jnp.int32)
    out = jax.nn.dot_product_attention(*(jnp.pad(t, widths) for t in (q, k, v)), scale=scale,
                                       query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return out[:, :n]


def _use_cudnn_attention(q: jax.Array, dropout_active: bool) -> bool:
    """cuDNN's fused (flash) attention: on GPU, in bf16/fp16, without attention dropout. It never
    materializes the (heads, n, n) weights (speed and memory against the plain path: benchmarks/RESULTS.md).
    ``PRISM_ATTENTION=xla`` forces the plain path."""
    if os.environ.get("PRISM_ATTENTION", "auto") == "xla" or dropout_active:
        return False
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(LN(x)), x + MLP(LN(x)) with GELU; stochastic depth on both."""

    def __init__(self, cfg: ViTConfig, drop_path: float, *, rngs: nnx.Rngs, tap_name: str = "attn"):
        d, hidden = cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio)
        self.norm1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, cfg.attention_dropout, cfg.dropout, rngs=rngs,
                              tap_name=tap_name)
        self.norm2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.fc1 = _linear(d, hidden, rngs=rngs)
        self.fc2 = _linear(hidden, d, rngs=rngs)
        self.mlp_drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        # Stochastic depth = dropout of a whole sample's residual branch: mask shared over tokens and channels.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.mlp_drop(nnx.gelu(self.fc1(self.norm2(x)), approximate=False))
        return x + self.drop_path(self.mlp_drop(self.fc2(y)))


class VisionTransformer(nnx.Module):
    """patchify -> [cls] + tokens + pos-embed -> blocks -> LayerNorm -> class token (``features``) -> ``head``.

    Taps (:mod:`prism.framework.taps`): ``tokens0``..``tokens{depth-1}`` (``tap_layers``), the patch tokens entering
    each block as a (batch, h, w, dim) grid, the last (the input of the last block, whose patch tokens still reach
    the class token through its attention) explained by default; ``attn0``.. (``attention_layers``), each block's
    attention weights."""

    def __init__(self, cfg: ViTConfig, image_size: int, in_channels: int, num_classes: int, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.embed_dim
        if image_size % p:
            raise ConfigError(f"image_size {image_size} is not a multiple of model.patch_size {p}")
        self.patch_size = p
        self.grid = image_size // p
        self.patch_embed = nnx.Conv(in_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                    kernel_init=torch_default, bias_init=zeros,
                                    conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.cls_token = nnx.Param(nnx.initializers.normal(1e-6)(rngs.params(), (1, 1, d)))
        self.pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, self.grid**2 + 1, d)))
        self.pos_drop = nnx.Dropout(cfg.dropout, rngs=rngs)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nnx.List([Block(cfg, r, rngs=rngs, tap_name=f"attn{i}") for i, r in enumerate(rates)])
        self.tap_layers = tuple(f"tokens{i}" for i in range(cfg.depth))
        self.attention_layers = tuple(f"attn{i}" for i in range(cfg.depth))
        self.norm = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.num_features = d
        self.head = _linear(d, num_classes, rngs=rngs)

    def _pos_embed(self, h: int, w: int) -> jax.Array:
        pos = self.pos_embed[...]
        if (h, w) == (self.grid, self.grid):
            return pos
        grid = pos[:, 1:].reshape(1, self.grid, self.grid, -1)
        grid = jax.image.resize(grid, (1, h, w, grid.shape[-1]), method="bicubic")
        return jnp.concatenate([pos[:, :1], grid.reshape(1, h * w, -1)], axis=1)

    def features(self, x: jax.Array) -> jax.Array:
        """The final-LayerNorm class token, shape (batch, num_features)."""
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        x = x.reshape(b, h * w, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self._pos_embed(h, w).astype(x.dtype)
        x = self.pos_drop(x)
        for i, block in enumerate(self.blocks):
            x = block(tap_grid_tokens(f"tokens{i}", x, h, w))
        return self.norm(x)[:, 0]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


def torch_rules(model: VisionTransformer) -> list:
    """timm ``vit_*_patch16_224`` state-dict names (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``); timm's fused qkv has our
    (3, heads, head_dim) output order."""
    rules = TorchRules(model).add("patch_embed", "patch_embed.proj").add("cls_token", "cls_token")
    rules.add("pos_embed", "pos_embed")
    for k in range(len(model.blocks)):
        for ours, theirs in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                             ("norm2", "norm2"), ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
            rules.add(f"blocks.{k}.{ours}", f"blocks.{k}.{theirs}")
    return rules.add("norm", "norm").add("head", "head").rules


def build_vit(cfg: ViTConfig, *, data: DataInfo, rngs: nnx.Rngs) -> VisionTransformer:
    image_size = cfg.image_size or data.image_shape[0]
    return VisionTransformer(cfg, image_size, data.image_shape[-1], num_classes_of(cfg.num_classes, data), rngs=rngs)


@dataclass
class ViTTiny16Config(ViTConfig):
    """ViT-Ti/16 (timm vit_tiny_patch16_224): width 192, 3 heads; fields as :class:`ViTConfig`."""

    embed_dim: int = field(default=192, metadata={"ge": 1})
    num_heads: int = field(default=3, metadata={"ge": 1})


@dataclass
class ViTSmall16Config(ViTConfig):
    """ViT-S/16 (timm vit_small_patch16_224): width 384, 6 heads; fields as :class:`ViTConfig`."""

    embed_dim: int = field(default=384, metadata={"ge": 1})
    num_heads: int = field(default=6, metadata={"ge": 1})


@dataclass
class ViTBase16Config(ViTConfig):
    """ViT-B/16 (timm vit_base_patch16_224): width 768, 12 heads; fields as :class:`ViTConfig`."""

    embed_dim: int = field(default=768, metadata={"ge": 1})
    num_heads: int = field(default=12, metadata={"ge": 1})


for _name, _label, _config in (("vit_ti16", "ViT-Ti/16", ViTTiny16Config), ("vit_s16", "ViT-S/16", ViTSmall16Config),
                               ("vit_b16", "ViT-B/16", ViTBase16Config)):
    MODELS.register(_name, config=_config, default_image_shape=(224, 224, 3), torch_weights=torch_rules,
                    description=f"{_label} (timm vit_*_patch16_224 layout; patch_size and image_size configurable).")(
        build_vit)
