"""Pretrained weights for a model: ``model.pretrained=PATH``.

``PATH`` is either

- a PyTorch state dict (``.safetensors``, read with safetensors' NumPy API, no torch needed; ``.pth``/``.pt``/
  ``.bin`` read with ``torch.load(weights_only=True)``, which unpickles no code; ``.npz``). The model's
  registry entry converts it: its ``torch_weights`` metadata is a function ``(model) -> list[TensorRule]``
  that says which file tensor fills which model variable and how (conv OIHW -> HWIO, linear transpose,
  BatchNorm running statistics -> batch stats, ...); see ``plugins/models/_torch_import.py``.
- a prism run directory, its ``checkpoints/`` directory or one ``checkpoints/STEP`` directory: the ``model``
  subtree of that run's checkpoint (its EMA weights when the run kept them), e.g. a self-supervised
  backbone to fine-tune.

Either way nothing is assigned until every tensor is found with the expected shape; otherwise a
:class:`WeightsError` names the first missing or mismatched tensor, its expected shape and the file. The
classifier head (the model's ``head`` attribute, the classifier contract) is the exception: when the file has
no head or one for another number of classes, the head keeps its initialisation and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism.framework.checkpoint import Checkpointer, CorruptCheckpointError
from prism.framework.config import CheckpointConfig
from prism.framework.errors import PrismError
from prism.framework.registry import MODELS

#: Registry metadata key of a model's PyTorch converter: ``(model) -> list[TensorRule]``.
TORCH_WEIGHTS = "torch_weights"
#: Optional registry metadata: ``(file key) -> key`` applied to a file's keys first (legacy names of old releases).
TORCH_RENAME = "torch_rename"
#: The attribute holding a classifier's head; loaded only when its shapes fit (another class count does not).
HEAD = "head"
#: State-dict entries that carry no weights (PyTorch BatchNorm's step counter).
IGNORED_SUFFIXES = ("num_batches_tracked",)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsError(PrismError):
    """A weight file is missing, unreadable, or does not fit the configured model."""


@dataclass(frozen=True)
class TensorRule:
    """One model variable filled from one file tensor.

    target: path of the variable in the model (``"stages.0.1.conv1.kernel"``, as ``nnx.iter_graph`` names it).
    source: key of the tensor in the file (``"layer2.1.conv1.weight"``).
    shape: shape the tensor must have in the file.
    transform: file layout -> model layout (``None``: the same).
    """

    target: str
    source: str
    shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class ImportReport:
    """What :func:`load_pretrained` did: tensors loaded and, when the head was left at its init, why."""

    path: str
    loaded: int = 0
    head_skipped: str = ""  # reason, empty when the head was loaded (or the model has none)

    def summary(self) -> str:
        text = f"loaded {self.loaded} pretrained tensors from {self.path}"
        if self.head_skipped:
            text += f"; head left at its initialisation ({self.head_skipped})"
        return text


# -- model variables ----------------------------------------------------------------------------------------
def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def weight_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{path: variable}`` of every variable that pretrained weights fill: all but RNG state."""
    return {_path_str(p): v for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and not isinstance(v, nnx.RngState)}


def _is_head(path: str) -> bool:
    return path == HEAD or path.startswith(HEAD + ".")


# -- reading files ------------------------------------------------------------------------------------------
def _unwrap(obj: Any) -> Any:
    """A training checkpoint's state dict: ``{"state_dict": ...}`` / ``{"model": ...}`` (timm, DeiT) unwrapped."""
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return obj[key]
    return obj


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {path} needs PyTorch (`pip install torch`); or save the state dict as "
                           f".safetensors (safetensors.torch.save_file), which prism reads without torch") from None
    try:  # weights_only: tensors and containers only, no arbitrary code from the pickle
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read {path} as a PyTorch state dict (torch.load with weights_only=True): "
                           f"{exc}") from exc
    state = _unwrap(obj)
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            out[key] = (value.float() if value.is_floating_point() and value.dtype != torch.float64 else value).numpy()
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """``{key: array}`` from a ``.safetensors``, ``.npz`` or PyTorch (``.pth``/``.pt``/``.bin``) file.

    A ``module.`` prefix on every key (``DataParallel``) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weight file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise WeightsError(f"reading {path} needs the safetensors package (`pip install safetensors`)") from None
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"cannot read {path} as safetensors: {exc}") from exc
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                state = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise WeightsError(f"cannot read {path} as a NumPy .npz archive: {exc}") from exc
    elif suffix in TORCH_SUFFIXES:
        state = _read_torch(path)
    else:
        raise WeightsError(f"unknown weight file type {path.name!r}: expected .safetensors, .npz, "
                           f"{', '.join(TORCH_SUFFIXES)}, or a prism run/checkpoint directory")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# -- applying -----------------------------------------------------------------------------------------------
def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _check_head(rules: list[TensorRule], tensors: Mapping[str, np.ndarray]) -> str:
    """Why the head rules cannot be applied ('' when they can)."""
    missing = [r for r in rules if r.source not in tensors]
    if len(missing) == len(rules):
        return "the file has no head tensors"
    if missing:
        return f"the file lacks head tensor {missing[0].source!r}"
    for r in rules:
        if _shape(tensors[r.source]) != r.shape:
            return (f"the file's {r.source!r} has shape {_shape(tensors[r.source])}, this model's head needs "
                    f"{r.shape}: another number of classes")
    return ""


def apply_rules(model: nnx.Module, rules: list[TensorRule], tensors: Mapping[str, np.ndarray], *, origin: str,
                what: str, report: ImportReport) -> ImportReport:
    """Check every rule against ``tensors``, then assign them all to ``model``'s variables (in place).

    ``origin`` names the file in errors, ``what`` the model. Raises :class:`WeightsError` for the first
    missing or mismatched tensor, or for a tensor in the file that no rule uses (weights of another model).
    """
    variables = weight_variables(model)
    unknown = [r.target for r in rules if r.target not in variables]
    if unknown:
        raise WeightsError(f"the weight converter of {what} names {unknown[0]!r}, which the model does not have "
                           f"(a bug in the model plugin)")
    covered = {r.target for r in rules}
    uncovered = [p for p in variables if p not in covered]
    if uncovered:
        raise WeightsError(f"the weight converter of {what} does not fill {uncovered[0]!r} "
                           f"({len(uncovered)} variables in all; a bug in the model plugin, or a config it does "
                           f"not support)")
    head = [r for r in rules if _is_head(r.target)]
    body = [r for r in rules if not _is_head(r.target)]
    for r in body:
        if r.source not in tensors:
            raise WeightsError(f"{origin}: tensor {r.source!r} (expected shape {r.shape}, for {what}'s {r.target}) "
                               f"is missing from the file")
        found = _shape(tensors[r.source])
        if found != r.shape:
            raise WeightsError(f"{origin}: tensor {r.source!r} has shape {found}, but {what}'s {r.target} needs "
                               f"{r.shape} (a different architecture or config?)")
    report.head_skipped = _check_head(head, tensors) if head else ""
    use = body if report.head_skipped else rules
    known = {r.source for r in rules}
    extra = [k for k in tensors if k not in known and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise WeightsError(f"{origin}: the file holds tensor {extra[0]!r} (shape {_shape(tensors[extra[0]])}), "
                           f"which {what} does not use ({len(extra)} unused in all): weights of another "
                           f"architecture or config?")
    for r in use:
        value = np.asarray(tensors[r.source])
        if r.transform is not None:
            value = r.transform(value)
        var = variables[r.target]
        if _shape(value) != _shape(var):
            raise WeightsError(f"the weight converter of {what} gives {r.target} shape {_shape(value)}, the model "
                               f"has {_shape(var)} (a bug in the model plugin)")
        var.set_value(jnp.asarray(value, dtype=var.dtype))
    report.loaded += len(use)
    return report


def load_torch_weights(model: nnx.Module, name: str, path: str | Path) -> ImportReport:
    """Fill ``model`` (built as registered model ``name``) from a PyTorch-style state-dict file."""
    converter = MODELS.get(name).metadata.get(TORCH_WEIGHTS)
    if converter is None:
        raise WeightsError(f"model {name!r} has no converter for PyTorch weights (registry metadata "
                           f"{TORCH_WEIGHTS!r}); it can load a prism run directory or checkpoint instead")
    tensors = read_state_dict(path)
    rename = MODELS.get(name).metadata.get(TORCH_RENAME)
    if rename is not None:
        tensors = {rename(k): v for k, v in tensors.items()}
    return apply_rules(model, converter(model), tensors, origin=str(path), what=f"model {name!r}",
                       report=ImportReport(str(path)))


# -- prism checkpoints --------------------------------------------------------------------------------------
#: Where a prism train state keeps the model: ``(TrainState field, System attribute)`` prefixes of its key paths.
_EMA, _PARAMS, _REST = ("ema_params", "model"), ("params", "model"), ("rest", "model")


def _checkpoint_step_dir(path: Path) -> tuple[Path, int | None]:
    """``(checkpoints directory, step or None for the latest)`` of a run dir, checkpoints dir or step dir."""
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "meta").exists():
        return path.parent, int(path.name)
    return path, None


def _legacy_names(model: nnx.Module, params: tuple[str, str]) -> dict[str, str]:
    """``{format-1 checkpoint key: model path}`` for ``model``'s variables: the keys that checkpoints written
    before the format marker used (``jax.tree_util.keystr`` of the state path, built here, never parsed)."""
    names = {}
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable) and not isinstance(var, nnx.RngState):
            field, attr = params if isinstance(var, nnx.Param) else _REST
            state_path = (jax.tree_util.GetAttrKey(field), *(jax.tree_util.DictKey(k) for k in (attr, *path)),
                          jax.tree_util.GetAttrKey("value"))
            names[jax.tree_util.keystr(state_path)] = _path_str(path)
    return names


def _legacy_prefix(field: tuple[str, str]) -> str:
    return jax.tree_util.keystr((jax.tree_util.GetAttrKey(field[0]), jax.tree_util.DictKey(field[1])))


def read_checkpoint_model(path: str | Path, model: nnx.Module) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``({model variable path: array}, meta)`` of the latest (or the given) checkpoint of a prism run.

    Parameters come from the run's EMA when it kept one (what its evaluation used), else its parameters;
    BatchNorm statistics and other non-RNG variables from the rest of the state. Only those arrays are read
    (an orbax partial restore of the subtrees that orbax's tree metadata lists), after the step's checksums
    are verified. ``model`` names the variables of checkpoints in the flat format 1.
    """
    root, step = _checkpoint_step_dir(Path(path))
    try:
        checkpointer = Checkpointer(root, CheckpointConfig(), read_only=True)
        step = checkpointer.latest_step() if step is None else step
    except Exception as exc:
        raise WeightsError(f"cannot open {path} as a prism run or checkpoint directory: {exc}") from exc
    try:
        if step is None:
            raise WeightsError(f"{path} holds no checkpoint (expected a prism run directory, its checkpoints/ "
                               f"directory or a checkpoints/STEP directory)")
        try:
            note = checkpointer.verify(step)
        except CorruptCheckpointError as exc:
            raise WeightsError(f"cannot load pretrained weights: {exc}") from None
        if note:
            logging.getLogger("prism.pretrained").info(note)
        try:
            meta = checkpointer.read_meta(step)
            version = checkpointer.format_version(step)
            tree = checkpointer.tree_shapes(step)
        except Exception as exc:
            raise WeightsError(f"the checkpoint at step {step} in {root} is not a prism checkpoint (no readable "
                               f"meta or tree metadata): {exc}") from exc
        wanted: dict[tuple[str, ...], str] = {}  # checkpoint key path -> model path
        if version >= 2:
            params = _EMA if any(k[:2] == _EMA for k in tree) else _PARAMS
            wanted = {k: ".".join(k[2:]) for k in tree if k[:2] in (params, _REST)}
        else:
            params = _EMA if any(k[0].startswith(_legacy_prefix(_EMA)) for k in tree) else _PARAMS
            names = _legacy_names(model, params)
            prefixes = (_legacy_prefix(params), _legacy_prefix(_REST))
            for (key,) in tree:
                if key in names:
                    wanted[(key,)] = names[key]
                elif key.startswith(prefixes) and "['rngs']" not in key:
                    wanted[(key,)] = key  # not one of this model's variables: reported as unused by name
        try:
            arrays = checkpointer.read_arrays(step, list(wanted))
        except Exception as exc:
            raise WeightsError(f"could not read the model from the checkpoint at step {step} in {root}: {exc}"
                               ) from exc
    finally:
        checkpointer.close()
    return {wanted[k]: v for k, v in arrays.items()}, {**meta, "step": step, "directory": str(root)}


def load_checkpoint_weights(model: nnx.Module, name: str, path: str | Path) -> ImportReport:
    """Fill ``model`` from the ``model`` subtree of a prism checkpoint (its own variable names)."""
    tensors, meta = read_checkpoint_model(path, model)
    rules = [TensorRule(p, p, _shape(v)) for p, v in weight_variables(model).items()]
    tensors = {k: v for k, v in tensors.items() if "rngs" not in k.split(".")}  # RNG streams are not weights
    origin = f"checkpoint step {meta['step']} in {meta['directory']} (model {meta.get('model', '?')!r})"
    return apply_rules(model, rules, tensors, origin=origin, what=f"model {name!r}", report=ImportReport(origin))


def load_pretrained(model: nnx.Module, name: str, path: str | Path) -> ImportReport:
    """Fill ``model`` (registered model ``name``) from ``path``: a weight file or a prism run/checkpoint dir."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        return load_checkpoint_weights(model, name, path)
    return load_torch_weights(model, name, path)
