"""Text recognition (OCR): per-column logits decoded with CTC's rule; CER, character and word accuracy.

Batches hold ``image``, ``text`` (character codes padded with 0) and ``text_length`` (the text-line datasets);
the model gives per-column logits (B, T, C) with class 0 the blank (``crnn``). A column sequence reads as the
text left after merging repeated classes and then dropping blanks (``aa-ab`` -> ``aab``). ``decoder=greedy``
takes each column's best class (under jit); ``decoder=beam`` runs CTC prefix beam search on the host
(Hannun et al. 2014), keeping the ``beam_width`` prefixes of highest probability summed over their alignments.

Metrics over the evaluation split: ``cer``, the character error rate (Levenshtein distance between recognized
and true text, summed over lines, over the number of true characters); ``char_accuracy`` = 1 - cer;
``word_accuracy``, the share of lines recognized exactly (each line one word, as in scene-text benchmarks);
``loss``, the mean CTC loss. ``prism predict`` writes each image's ``text``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw

from prism.framework.api import Batch, DataInfo, Task
from prism.framework.errors import ConfigError
from prism.framework.registry import TASKS
from prism.plugins.objectives.ctc import check_logits, ctc_losses

DECODERS = ("greedy", "beam")
RIGHT_COLOUR, WRONG_COLOUR = (0, 160, 0), (220, 30, 30)


@dataclass
class TextRecognitionConfig:
    """decoder: 'greedy' (best class per column) or 'beam' (CTC prefix beam search on the host).
    beam_width: prefixes the beam search keeps.
    beam_prune: the beam search extends a prefix only by classes of at least this probability in a column
        (and always by the column's best).
    """

    decoder: str = field(default="greedy", metadata={"choices": DECODERS})
    beam_width: int = field(default=8, metadata={"ge": 1})
    beam_prune: float = field(default=1e-3, metadata={"ge": 0, "lt": 1})


# -- decoding ---------------------------------------------------------------------------------------------
def greedy_decode(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(codes (B, T) left-aligned, padded with 0; lengths (B,); best path log-probability (B,))`` of per-column
    logits (B, T, C): each column's best class, repeats merged, blanks (0) dropped. Runs under jit."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    best = jnp.argmax(log_probs, axis=-1)
    previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    keep = (best != 0) & (best != previous)
    position = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, best.shape[1])  # out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(best.shape[0])[:, None], best.shape)
    codes = jnp.zeros_like(best).at[rows, position].set(best, mode="drop")
    return codes.astype(jnp.int32), keep.sum(axis=1).astype(jnp.int32), jnp.max(log_probs, axis=-1).sum(axis=1)


def beam_decode(log_probs: np.ndarray, beam_width: int = 8, prune: float = 1e-3) -> tuple[list[int], float]:
    """``(codes, log-probability)`` of the best text CTC prefix beam search finds in one line's per-column
    log-probabilities ``log_probs`` (T, C), blank 0. The probability is summed over the alignments the beam kept."""
    log_probs = np.asarray(log_probs, np.float64)
    threshold = np.log(prune) if prune > 0 else -np.inf
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -np.inf)}  # prefix -> (log p ends blank, not)
    for column in log_probs:
        candidates = set(np.flatnonzero(column >= threshold).tolist()) | {int(np.argmax(column))}
        candidates.discard(0)
        grown: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], slot: int, value: float, grown: dict = grown) -> None:
            entry = grown.setdefault(prefix, [-np.inf, -np.inf])
            entry[slot] = np.logaddexp(entry[slot], value)

        for prefix, (blank, char) in beams.items():
            total = np.logaddexp(blank, char)
            add(prefix, 0, total + column[0])
            for c in candidates:
                if prefix and prefix[-1] == c:
                    add(prefix + (c,), 1, blank + column[c])  # a repeat needs a blank in between
                    add(prefix, 1, char + column[c])  # else it merges into the last character
                else:
                    add(prefix + (c,), 1, total + column[c])
        ranked = sorted(grown.items(), key=lambda item: -np.logaddexp(*item[1]))[:beam_width]
        beams = {prefix: (b, c) for prefix, (b, c) in ranked}
    best, (blank, char) = max(beams.items(), key=lambda item: np.logaddexp(*item[1]))
    return list(best), float(np.logaddexp(blank, char))


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each 1) between sequences ``a`` and ``b``."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


def text_metrics(predicted: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> dict[str, float]:
    """``cer``, ``char_accuracy`` (1 - cer) and ``word_accuracy`` (exact lines) of recognized against true texts."""
    errors = sum(edit_distance(p, t) for p, t in zip(predicted, truth, strict=True))
    characters = sum(len(t) for t in truth)
    cer = errors / characters if characters else float(errors > 0)
    exact = [list(p) == list(t) for p, t in zip(predicted, truth, strict=True)]
    return {"cer": cer, "char_accuracy": 1.0 - cer, "word_accuracy": float(np.mean(exact)) if exact else 0.0}


class TextRecognition(Task):
    batch_keys = ("image", "text", "text_length")

    def __init__(self, cfg: TextRecognitionConfig, info: DataInfo) -> None:
        if cfg.decoder not in DECODERS:
            raise ConfigError(f"task.decoder must be one of {', '.join(DECODERS)}, got {cfg.decoder!r}")
        if info.num_classes < 2:
            raise ConfigError(f"task text_recognition needs a text dataset (a blank and at least one character), "
                              f"the dataset has {info.num_classes} class(es)")
        self.cfg = cfg
        self.class_names = tuple(info.class_names) or tuple(str(i) for i in range(info.num_classes))

    # -- under jit --------------------------------------------------------------------------------------
    def predict_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        logits = model(batch["image"])
        check_logits(logits, 0, "task text_recognition")
        codes, lengths, path = greedy_decode(logits)
        outputs = {"codes": codes, "length": lengths, "path_log_prob": path}
        if self.cfg.decoder == "beam":
            outputs["log_probs"] = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return outputs

    def eval_outputs(self, model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
        logits = model(batch["image"])
        check_logits(logits, batch["text"].shape[1], "task text_recognition")
        codes, lengths, path = greedy_decode(logits)
        outputs = {"codes": codes, "length": lengths, "text": batch["text"], "text_length": batch["text_length"],
                   "loss": ctc_losses(logits, batch["text"], batch["text_length"])}
        if self.cfg.decoder == "beam":
            outputs["log_probs"] = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return outputs

    # -- on the host --------------------------------------------------------------------------------------
    def decoded(self, outputs: Mapping[str, np.ndarray]) -> list[list[int]]:
        """Each line's recognized codes, by the configured decoder."""
        if self.cfg.decoder == "beam":
            return [beam_decode(lp, self.cfg.beam_width, self.cfg.beam_prune)[0] for lp in outputs["log_probs"]]
        return [list(c[:n]) for c, n in zip(np.asarray(outputs["codes"]), np.asarray(outputs["length"]),
                                            strict=True)]

    def as_text(self, codes: Sequence[int]) -> str:
        return "".join(self.class_names[c] for c in codes if 0 < c < len(self.class_names))

    def describe(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"decoder": self.cfg.decoder,
                                    "cer": "Levenshtein distance / true characters, summed over lines",
                                    "word_accuracy": "share of lines recognized exactly"}
        if self.cfg.decoder == "beam":
            settings.update(beam_width=self.cfg.beam_width, beam_prune=self.cfg.beam_prune)
        return settings

    def summarize(self, outputs: Mapping[str, np.ndarray], reference: Any = None) -> dict[str, float]:
        truth = [list(t[:n]) for t, n in zip(np.asarray(outputs["text"]), np.asarray(outputs["text_length"]),
                                             strict=True)]
        metrics = text_metrics(self.decoded(outputs), truth)
        metrics["loss"] = float(np.mean(outputs["loss"])) if len(truth) else 0.0
        return metrics

    def prediction_record(self, outputs: Mapping[str, np.ndarray], image_size: tuple[int, int]) -> dict:
        """One image's recognized text and its log-probability (the best path's, or the beam's)."""
        if self.cfg.decoder == "beam":
            codes, log_prob = beam_decode(outputs["log_probs"], self.cfg.beam_width, self.cfg.beam_prune)
        else:
            codes, log_prob = list(outputs["codes"][:int(outputs["length"])]), float(outputs["path_log_prob"])
        return {"text": self.as_text(codes), "log_prob": log_prob}

    def render(self, batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], directory: Path) -> list[Path]:
        """PNGs of each image (twice its size) over its recognized text: green when it equals the true text (when
        the batch has it), red when not, black without one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names, written = batch.get("filename"), []
        decoded = self.decoded(outputs)
        for i, image in enumerate(np.asarray(batch["image"])):
            image = image[..., 0] if image.shape[-1] == 1 else image
            picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
            picture = picture.resize((picture.width * 2, picture.height * 2), Image.Resampling.NEAREST)
            canvas = Image.new("RGB", (max(picture.width, 160), picture.height + 30), (255, 255, 255))
            canvas.paste(picture, (0, 0))
            text, colour, label = self.as_text(decoded[i]), (0, 0, 0), ""
            if "text" in batch and "text_length" in batch:
                truth = self.as_text(np.asarray(batch["text"][i])[:int(batch["text_length"][i])])
                colour, label = (RIGHT_COLOUR, "") if truth == text else (WRONG_COLOUR, f" (true: {truth})")
            ImageDraw.Draw(canvas).text((2, picture.height + 4), f"{text!r}{label}", fill=colour)
            stem = Path(str(names[i])).stem if names is not None else f"{i:03d}"
            path = directory / f"{stem}.png"
            canvas.save(path)
            written.append(path)
        return written


@TASKS.register("text_recognition", config=TextRecognitionConfig,
                description="Text recognition (OCR) with CTC decoding: CER, character accuracy, word accuracy.")
def build_text_recognition(cfg: TextRecognitionConfig, *, data: DataInfo) -> TextRecognition:
    return TextRecognition(cfg, data)
