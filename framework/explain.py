"""Explanations of a saved classifier: ``prism explain checkpoint=RUN_DIR input=IMAGE_OR_FOLDER method=NAME``.

The run is rebuilt and restored as ``prism predict`` does (:func:`prism.framework.evaluate.load_run`) and its
images read the same way (:func:`prism.framework.predict.image_paths`, :func:`~prism.framework.predict.read_image`).
The method is an :class:`~prism.framework.api.Explainer` of the ``EXPLAINERS`` registry, its settings given as
``method.KEY=VALUE`` (typed and range-checked against its config dataclass). The score explained is the logit of
``target``: the predicted class (``pred``) or a class given by index or name. For every image the command writes
to ``out`` (default ``RUN_DIR/explain/<method>-<time>/``) ``<name>.png`` (the image beside the map overlaid on it,
captioned with the class and its probability) and ``<name>.npy`` (the raw map, float32, at the method's own
resolution: a layer's grid for Grad-CAM, the patch grid for rollout, pixels for gradient methods), and
``explanations.json`` describing them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prism.framework.api import Explainer, missing_members
from prism.framework.errors import ConfigError
from prism.framework.registry import EXPLAINERS

EXPLANATIONS_FILE = "explanations.json"


def build_explainer(name: str, settings: Mapping[str, Any] | None = None, *, where: str = "method"
                    ) -> tuple[Explainer, Any]:
    """``(explainer, its config)`` of the registered explainer ``name`` with ``settings`` (``{key: value}``) over
    its config's defaults; a value of the wrong type or outside its range is a ConfigError naming ``where.key``."""
    from prism.framework.validate import validate_node

    entry = EXPLAINERS.get(name)
    settings = dict(settings or {})
    if entry.config is None:
        if settings:
            raise ConfigError(f"{where}={name} takes no settings, got {', '.join(f'{where}.{k}' for k in settings)}")
        return entry.builder(), None
    node = OmegaConf.structured(entry.config)
    fields = [f.name for f in dataclasses.fields(entry.config)]
    for key, value in settings.items():
        if key not in fields:
            import difflib

            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
            hint = f" Did you mean: {', '.join(f'{where}.{c}' for c in close)}?" if close else ""
            raise ConfigError(f"unknown setting {where}.{key} of explainer {name!r}.{hint} Settings: "
                              f"{', '.join(fields) or '(none)'}")
        try:
            OmegaConf.update(node, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{where}.{key}={value!r}: {str(exc).splitlines()[0]}") from None
    validate_node(node, where)
    cfg = OmegaConf.to_object(node)
    return entry.builder(cfg), cfg


def check_model(explainer: Explainer, model: Any, method: str, model_name: str) -> None:
    """A ConfigError when ``model`` lacks what ``explainer`` needs of it (its ``model_contract``)."""
    contract = explainer.model_contract
    missing = missing_members(model, contract) if contract is not None else []
    if missing:
        raise ConfigError(f"method {method!r} needs a model with {', '.join(missing)} ({contract.__name__}); "
                          f"model {model_name!r} ({type(model).__name__}) has not")


def resolve_target(target: str | int, class_names: Sequence[str], num_classes: int) -> int:
    """The class index of ``target``: -1 for ``pred`` (the predicted class), else an index or a class name."""
    text = str(target)
    if text == "pred":
        return -1
    if text in class_names:
        return list(class_names).index(text)
    try:
        index = int(text)
    except ValueError:
        names = f" or a class name ({', '.join(class_names)})" if class_names else ""
        raise ConfigError(f"target must be pred, a class index in [0, {num_classes}){names}; got {text!r}") from None
    if not 0 <= index < num_classes:
        raise ConfigError(f"target={index} is not a class index in [0, {num_classes})")
    return index


def heat_colours(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of ``values`` in [0, 1] through matplotlib's ``jet`` colour map."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255).astype(np.uint8)


def normalized_map(saliency: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``saliency`` (h, w) resized bilinearly to ``size`` (height, width) and scaled to [0, 1] (min to max)."""
    from PIL import Image

    m = np.asarray(saliency, np.float32)
    m = np.asarray(Image.fromarray(m).resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float32)
    low, high = float(m.min()), float(m.max())
    return (m - low) / (high - low) if high > low else np.zeros_like(m)


def overlay_picture(image: np.ndarray, saliency: np.ndarray, caption: str, path: Path, *, side: int = 192,
                    alpha: float = 0.5) -> Path:
    """Write a PNG: ``image`` (uint8 (H, W, C)) beside the map blended over it, ``caption`` above both."""
    from PIL import Image, ImageDraw

    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    scale = max(1, side // max(rgb.shape[:2]))
    size = (rgb.shape[0] * scale, rgb.shape[1] * scale)
    big = np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.Resampling.BILINEAR), np.float32)
    heat = heat_colours(normalized_map(saliency, size)).astype(np.float32)
    blended = ((1 - alpha) * big + alpha * heat).astype(np.uint8)
    bar = 16
    canvas = Image.new("RGB", (2 * size[1] + 4, size[0] + bar), "white")
    canvas.paste(Image.fromarray(big.astype(np.uint8)), (0, bar))
    canvas.paste(Image.fromarray(blended), (size[1] + 4, bar))
    ImageDraw.Draw(canvas).text((2, 2), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _names(paths: Sequence[Path]) -> list[str]:
    """A file name stem per image, unique (an index in front where two files share a stem)."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{i:04d}-{s}" for i, s in enumerate(stems)]


def make_explain_step(run: Any, explainer: Explainer, layer: str | None):
    """``step(state, batch) -> {map, class, prob, pred, pred_prob}`` under jit: the run's evaluation model on the
    batch's uint8 ``image``, explaining the logit of ``target`` (-1: the predicted class) with ``explainer``."""
    import jax
    import jax.numpy as jnp

    from prism.framework.api import InputSpace
    from prism.framework.steps import evaluation_system, prepare_images

    def step(state, batch):
        system = evaluation_system(state, run.eval_graphdef, run.compute_dtype)
        model = system.model
        x = prepare_images({"image": batch["image"]}, run.info, run.compute_dtype)["image"]
        logits = model(x).astype(jnp.float32)
        pred = jnp.argmax(logits, axis=-1)
        target = jnp.where(batch["target"] < 0, pred, batch["target"])
        rows = jnp.arange(x.shape[0])
        probs = jax.nn.softmax(logits, axis=-1)
        maps = explainer.explain(model, lambda z: model(z).astype(jnp.float32)[rows, target], x, layer=layer,
                                 key=jax.random.key(0), space=InputSpace.of(run.info))
        return {"map": maps.astype(jnp.float32), "class": target, "prob": probs[rows, target], "pred": pred,
                "pred_prob": probs[rows, pred]}

    return step


def explain_run(run_dir: str | Path, source: str | Path, method: str, *, settings: Mapping[str, Any] | None = None,
                target: str | int = "pred", layer: str = "", overrides: Sequence[str] = (), step: str | int = "best",
                out_dir: str | Path | None = None) -> dict:
    """Explain the run in ``run_dir`` on the images at ``source`` (see the module docstring); returns a summary."""
    import jax

    from prism.framework import parallel
    from prism.framework.data import VALID_KEY, eval_batches
    from prism.framework.evaluate import load_run
    from prism.framework.logging import to_json
    from prism.framework.predict import image_paths, read_image
    from prism.framework.taps import choose_layer

    explainer, cfg = build_explainer(method, settings)  # bad settings fail before the run is loaded
    paths = image_paths(source)
    run_dir = Path(run_dir)
    run, restored = load_run(run_dir, overrides, step)
    model = run.abstract_system.model
    check_model(explainer, model, method, run.cfg.model.name)
    if explainer.uses_layer:
        layer = choose_layer(model, layer)
    elif layer:
        users = [n for n in EXPLAINERS.names() if getattr(EXPLAINERS.build(n), "uses_layer", False)]
        raise ConfigError(f"layer= applies to the methods that explain a layer ({', '.join(users)}), not {method!r}")
    shape = tuple(run.info.image_shape)
    from prism.framework.steps import evaluation_system

    logits = jax.eval_shape(lambda state: evaluation_system(state, run.eval_graphdef, run.compute_dtype).model(
        jax.numpy.zeros((1, *shape), run.compute_dtype)), run.state)
    if logits.ndim != 2:
        raise ConfigError(f"prism explain explains classifiers (a model giving (batch, classes) logits); model "
                          f"{run.cfg.model.name!r} gives {logits.shape}")
    target_index = resolve_target(target, run.info.class_names, logits.shape[-1])
    images, sizes = zip(*(read_image(p, shape) for p in paths), strict=True)
    explain = jax.jit(make_explain_step(run, explainer, layer or None), out_shardings=parallel.batch_sharding(run.mesh))
    collected: dict[str, list[np.ndarray]] = {}
    examples = [{"image": im, "target": np.int32(target_index)} for im in images]
    devices = run.mesh.devices.size  # no larger batch than the images need: gradient methods run it many times
    batch = min(run.eval_batch_size, -(-len(examples) // devices) * devices)
    for host_batch in eval_batches(examples, global_batch=batch, host=parallel.host_batch_slice(batch, run.mesh)):
        valid = host_batch.pop(VALID_KEY)
        outputs = parallel.valid_outputs(explain(run.state, parallel.global_batch(run.mesh, host_batch)), valid)
        for name, value in outputs.items():
            collected.setdefault(name, []).append(value)
    outputs = {name: np.concatenate(parts) for name, parts in collected.items()}
    out_dir = Path(out_dir) if out_dir else run_dir / "explain" / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    class_names = run.info.class_names
    label = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    records = []
    if run.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, (path, name) in enumerate(zip(paths, _names(paths), strict=True)):
            saliency = outputs["map"][i]
            np.save(out_dir / f"{name}.npy", saliency)
            cls, prob = int(outputs["class"][i]), float(outputs["prob"][i])
            where = f" @ {layer}" if layer else ""
            caption = f"{method}{where}: {label(cls)} p={prob:.2f}"
            overlay_picture(images[i], saliency, caption, out_dir / f"{name}.png")
            records.append({"file": str(path), "height": sizes[i][0], "width": sizes[i][1], "class": cls,
                            "class_name": label(cls), "prob": prob, "predicted": int(outputs["pred"][i]),
                            "predicted_prob": float(outputs["pred_prob"][i]), "map": f"{name}.npy",
                            "map_shape": list(saliency.shape), "picture": f"{name}.png"})
        result = {"checkpoint": str(run_dir.absolute()), "step": restored if restored is not None else "init",
                  "method": method, "settings": explainer.describe(), "layer": layer or None,
                  "target": str(target), "overrides": list(overrides), "images": records}
        (out_dir / EXPLANATIONS_FILE).write_text(to_json(result, indent=2))
    return {"out_dir": str(out_dir), "images": len(paths), "step": restored, "method": method,
            "layer": layer or None}
