"""Size and cost of a registered model: parameter count and forward GFLOPs from XLA's cost analysis.

Nothing is allocated: the model is built abstractly (``nnx.eval_shape``) and its forward pass is lowered and
compiled for shapes only, so ``model_summary("vit_b16")`` needs no parameter memory. It still takes seconds per
deep model on a CPU (tracing and lowering), so ``prism list model`` shows results cached by :func:`cached_summary`
and ``prism list model --stats`` computes the missing ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.compilation_cache import cache_dir
from prism.framework.registry import MODELS

DEFAULT_IMAGE_SHAPE = (224, 224, 3)


def count_params(module: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param``); BatchNorm running statistics are not counted."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def default_image_shape(name: str) -> tuple[int, int, int]:
    """The input shape a model is summarised at: its registry metadata ``default_image_shape``, else 224x224x3."""
    return tuple(MODELS.get(name).metadata.get("default_image_shape", DEFAULT_IMAGE_SHAPE))


def _flops(cost: Any) -> float:
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        return sum(_flops(c) for c in cost)
    return float((cost or {}).get("flops", 0.0))


def model_summary(name: str, image_shape: tuple[int, int, int] | None = None, num_classes: int = 1000,
                  cfg: Any = None) -> dict[str, Any]:
    """``{"params": int, "gflops": float}`` of model ``name`` (default config unless ``cfg``).

    ``params`` counts ``nnx.Param`` leaves for ``num_classes`` classes and ``image_shape`` (H, W, C) inputs
    (default: the entry's ``default_image_shape`` metadata, else 224x224x3). ``gflops`` is XLA's
    cost-analysis ``flops`` of one eval-mode forward pass at batch 1, divided by 1e9 (a multiply-add counts
    as 2 FLOPs; XLA does not count taps that fall on convolution padding, so conv nets come out a few
    percent below the usual 2 x MACs figures, e.g. ResNet-18 at 224: 3.37 vs 3.63); 0.0 when the backend
    reports no cost analysis.
    """
    shape = tuple(image_shape) if image_shape is not None else default_image_shape(name)
    data = DataInfo(num_classes=num_classes, image_shape=shape)
    model = nnx.eval_shape(lambda: MODELS.build(name, cfg, data=data, rngs=nnx.Rngs(0)))
    params = count_params(model)
    model.eval()
    graphdef, state = nnx.split(model)

    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    images = jax.ShapeDtypeStruct((1, *shape), jax.numpy.float32)
    lowered = jax.jit(forward).lower(state, images)
    flops = _flops(lowered.cost_analysis())  # HLO-level analysis: same count as the compiled one, no compile
    if not flops:
        flops = _flops(lowered.compile().cost_analysis())
    return {"params": params, "gflops": flops / 1e9}


# -- cached summaries (``prism list model --stats``) -----------------------------------------------------
STATS_FILE = "model_stats.json"


def _source_digest(module: str) -> str:
    """Hash of the ``.py`` files beside the module that defines a plugin (its package's code: a change to a
    shared layer file changes every model of that package)."""
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    digest = hashlib.sha256()
    if origin is not None and origin.exists():
        for file in sorted(origin.parent.glob("*.py")):
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def summary_key(name: str) -> str:
    """Cache key of ``model_summary(name)`` at its defaults: the model name, its default config, its input
    shape, the code of its plugin package and the JAX/Flax versions (any of them changes the numbers)."""
    import flax

    entry = MODELS.get(name)
    config = entry.default_config()
    parts = {
        "name": name,
        "config": repr(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else repr(config),
        "image_shape": list(default_image_shape(name)),
        "source": _source_digest(entry.module),
        "jax": jax.__version__,
        "flax": flax.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _read_stats(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: recomputed
        return {}
    return data if isinstance(data, dict) else {}


def cached_summary(name: str, *, compute: bool = True) -> dict[str, Any] | None:
    """``model_summary(name)`` at its defaults, from the cache file in :func:`cache_dir` when there (keyed by
    :func:`summary_key`); otherwise computed and stored when ``compute``, else ``None``."""
    path = cache_dir() / STATS_FILE
    key = summary_key(name)
    hit = _read_stats(path).get(key)
    if hit is not None or not compute:
        return hit
    summary = {**model_summary(name), "model": name}
    stats = _read_stats(path)  # re-read: another process may have added entries meanwhile
    stats[key] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one
    return summary
