"""Predictions of a saved run on unlabelled images: ``prism predict checkpoint=RUN_DIR input=IMAGE_OR_FOLDER``.

The run is rebuilt with :func:`prism.framework.evaluate.load_run` (its config and checkpoint); each image is read
with PIL, converted to the run's channels and resized (bilinear) to its input size, as the datasets do,
and goes through the run's normalization and the task's ``predict_outputs`` under jit
(:func:`prism.framework.steps.make_predict_step`), batched and unpadded as an evaluation is. The task draws
the predictions (``render``: one PNG per image, at the model's input size) and
describes each image's predictions for ``predictions.json`` (``prediction_record``; detection: boxes in the
file's own pixels, scores, classes). Everything goes to ``out`` (default ``RUN_DIR/predict/<time>/``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from prism.framework import parallel
from prism.framework.data import VALID_KEY, eval_batches
from prism.framework.errors import DataError
from prism.framework.evaluate import load_run
from prism.framework.logging import to_json
from prism.framework.steps import make_predict_step

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
PREDICTIONS_FILE = "predictions.json"


def image_paths(source: str | Path) -> list[Path]:
    """``source`` itself if it is a file, else the images in the folder (any depth, sorted)."""
    source = Path(source).expanduser()
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise DataError(f"input={source}: no such image file or folder")
    paths = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"input={source}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_image(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """``(uint8 (H, W, C) resized to shape, original (height, width))``; an unreadable file is a DataError."""
    height, width, channels = shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            size = (im.height, im.width)
            resized = im.resize((width, height), Image.Resampling.BILINEAR) if size != (height, width) else im
            return np.asarray(resized, np.uint8).reshape(height, width, channels), size
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"input image {path} cannot be read: {type(exc).__name__}: {exc}") from None


def predict_run(run_dir: str | Path, source: str | Path, overrides: Sequence[str] = (), step: str | int = "best",
                out_dir: str | Path | None = None) -> dict:
    """Predict on the images at ``source`` with the run in ``run_dir``; writes PNGs and ``predictions.json``."""
    run_dir = Path(run_dir)
    paths = image_paths(source)
    out_dir = Path(out_dir) if out_dir else run_dir / "predict" / time.strftime("%Y%m%d-%H%M%S")
    run, restored = load_run(run_dir, overrides, step)
    shape = tuple(run.info.image_shape)
    images, sizes = zip(*(read_image(p, shape) for p in paths), strict=True)
    predict = jax.jit(make_predict_step(run.eval_graphdef, run.task, run.info, dtype=run.compute_dtype),
                      out_shardings=parallel.batch_sharding(run.mesh))
    collected: dict[str, list[np.ndarray]] = {}
    for host_batch in eval_batches([{"image": im} for im in images], global_batch=run.eval_batch_size,
                                   host=run.eval_host):
        valid = host_batch.pop(VALID_KEY)
        outputs = parallel.valid_outputs(predict(run.state, parallel.global_batch(run.mesh, host_batch)), valid)
        for name, value in outputs.items():
            collected.setdefault(name, []).append(value)
    outputs = {name: np.concatenate(parts) for name, parts in collected.items()}
    records, pictures = [], []
    if run.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        names = np.array([p.name for p in paths])
        pictures = run.task.render({"image": np.stack(images), "filename": names}, outputs, out_dir)
        for i, (path, size) in enumerate(zip(paths, sizes, strict=True)):
            record = run.task.prediction_record({k: v[i] for k, v in outputs.items()}, size)
            records.append({"file": str(path), "height": size[0], "width": size[1], **record})
        result = {"checkpoint": str(run_dir.absolute()), "step": restored if restored is not None else "init",
                  "task": run.cfg.task.name, "task_settings": run.task.describe(),
                  "overrides": list(overrides), "images": records, "pictures": [str(p) for p in pictures]}
        (out_dir / PREDICTIONS_FILE).write_text(to_json(result, indent=2))
    return {"out_dir": str(out_dir), "images": len(paths), "step": restored, "pictures": [str(p) for p in pictures]}
