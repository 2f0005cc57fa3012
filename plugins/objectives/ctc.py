"""Connectionist temporal classification (Graves et al. 2006) for text lines: ``optax.ctc_loss``.

The model gives per-column logits (B, T, C) (``crnn``); the batch holds ``text`` (B, L) character codes padded
with 0 and ``text_length`` (B,) (the text-line datasets). Class 0 is the blank. The loss is the negative log
likelihood of each line's text summed over all its alignments to the T columns, averaged over the batch
(``normalize=length``: each line's divided by its length first, so long lines do not dominate).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from prism.framework.api import Batch, DataInfo, Objective
from prism.framework.errors import ConfigError
from prism.framework.registry import OBJECTIVES


@dataclass
class CTCConfig:
    """normalize: 'none' (mean of each line's negative log likelihood) or 'length' (each divided by its
    text length, at least 1, before the mean)."""

    normalize: str = field(default="none", metadata={"choices": ("none", "length")})


def check_logits(logits: jax.Array, max_length: int, who: str) -> None:
    """A one-line ConfigError (at trace time) unless ``logits`` are per-column (B, T, C) with T >= ``max_length``."""
    if logits.ndim != 3:
        raise ConfigError(f"{who} needs a model giving per-column logits (batch, columns, classes), like crnn; the "
                          f"model gives shape {tuple(logits.shape)}")
    if logits.shape[1] < max_length:
        raise ConfigError(f"{who}: the model gives {logits.shape[1]} columns, fewer than dataset.max_length="
                          f"{max_length} characters; use fewer model.horizontal_pools or wider images")


def ctc_losses(logits: jax.Array, text: jax.Array, text_length: jax.Array) -> jax.Array:
    """Each line's CTC negative log likelihood (B,): logits (B, T, C), blank 0, ``text`` padded after its length."""
    logit_paddings = jnp.zeros(logits.shape[:2], jnp.float32)
    label_paddings = (jnp.arange(text.shape[1])[None, :] >= text_length[:, None]).astype(jnp.float32)
    return optax.ctc_loss(logits.astype(jnp.float32), logit_paddings, text, label_paddings, blank_id=0)


class CTC(Objective):
    """Mean CTC loss of the model's per-column logits against ``batch['text']``."""

    def __init__(self, cfg: CTCConfig) -> None:
        if cfg.normalize not in ("none", "length"):
            raise ConfigError(f"objective.normalize must be 'none' or 'length', got {cfg.normalize!r}")
        self.normalize = cfg.normalize

    def __call__(self, model: nnx.Module, batch: Batch, key: jax.Array) -> tuple[jax.Array, dict]:
        logits = model(batch["image"])
        check_logits(logits, batch["text"].shape[1], "objective ctc")
        losses = ctc_losses(logits, batch["text"], batch["text_length"])
        per_char = losses / jnp.maximum(batch["text_length"], 1).astype(jnp.float32)
        loss = per_char.mean() if self.normalize == "length" else losses.mean()
        return loss, {"loss_per_char": per_char.mean()}


@OBJECTIVES.register("ctc", config=CTCConfig, description="CTC loss (optax) of per-column logits against text.")
def build_ctc(cfg: CTCConfig, *, model: nnx.Module, data: DataInfo, rngs: nnx.Rngs) -> CTC:
    return CTC(cfg)
