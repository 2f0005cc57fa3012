"""Export a saved run's inference function: ``prism export checkpoint=RUN format=onnx|stablehlo``.

What is exported is the run's model in evaluation mode (BatchNorm running statistics, no dropout) with the weights
evaluation uses (the EMA ones when the run kept them), its input normalization included: the artifact takes the
images as stored, **uint8 NHWC** ``(batch, H, W, C)`` at the run's input size, divides by 255 and applies the
dataset's mean/std recorded in the checkpoint, then the model; its outputs are the model's own, in float32 (a
classifier's logits; a detector's raw heads, decoding and NMS left to the caller; a segmenter's per-pixel logits).
``batch=dynamic`` (default) leaves the batch symbolic, ``batch=N`` fixes it. The graph computes in float32 whatever
precision the run trained in (a ``precision=bf16`` run keeps float32 master weights).

- ``format=stablehlo``: :func:`jax.export.export` of the jitted function, serialized (``Exported.serialize()``)
  to ``.stablehlo``; ``jax.export.deserialize(bytes).call(images)`` runs it in any JAX process without prism.
- ``format=onnx``: through jax2onnx (``pip install -e ".[export]"``). The function is first traced to a jaxpr of
  ``lax`` primitives here, and jax2onnx converts that jaxpr (:func:`evaluate_jaxpr` re-plays it inside its trace):
  its flax-level shims (nnx.Conv, nnx.max_pool) would otherwise replace prism's layers. Three primitives whose
  jax2onnx lowering is wrong or unsupported are re-expressed on the way with the same values: ``reduce_window_max``
  (jax2onnx emits a 4-D MaxPool onnxruntime refuses) as a maximum of strided slices, ``pad`` (a symbolic batch
  breaks it) as a concatenation with constant blocks, and input-dilated convolutions (``ConvTranspose``) as an
  explicit dilation followed by a plain convolution.

**Parity gate**: the artifact is loaded back (onnxruntime, or ``jax.export.deserialize``) and run on
``export.images`` (32) real evaluation images of the run's dataset; the export fails (exit 1, one line) unless
every output is within ``max|diff| <= export.atol + export.rtol * max|jax|`` of the JAX function's. ``export.json``
beside the artifact records the tolerance, max |diff|, top-1 agreement (2-D outputs), inputs, outputs and the
normalization.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prism.framework import conv
from prism.framework.errors import ConfigError, PrismError
from prism.framework.steps import evaluation_system, prepare_images

FORMATS = {"onnx": ".onnx", "stablehlo": ".stablehlo"}
EXPORT_FILE = "export.json"
INPUT_NAME = "image"
EXTRA_HINT = 'pip install -e ".[export]"'
OPTIONS = ("checkpoint", "format", "step", "batch", "out", "export.images", "export.atol", "export.rtol")


class ParityError(PrismError):
    """The exported artifact's outputs differ from the JAX function's beyond the tolerance."""


# -- the inference function ---------------------------------------------------------------------------------------
def inference_function(run) -> tuple[Callable[[jax.Array], tuple[jax.Array, ...]], dict[str, Any]]:
    """``(fn, meta)``: ``fn(uint8 images (B, H, W, C)) -> tuple of float32 outputs`` of the restored ``run`` in
    evaluation mode, normalization included, its weights as constants (host copies: the artifact holds them);
    ``meta`` describes the input and the normalization."""
    state = jax.device_get(run.state)
    info = run.info

    def fn(images: jax.Array) -> tuple[jax.Array, ...]:
        system = evaluation_system(state, run.eval_graphdef, run.compute_dtype)
        batch = prepare_images({"image": images}, info, run.compute_dtype)
        outputs = system.model(batch["image"])
        return tuple(jnp.asarray(o).astype(jnp.float32) for o in jax.tree.leaves(outputs))

    meta = {"input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "shape": ["batch", *info.image_shape],
                      "preprocessing": "x / 255, then (x - mean) / std per channel (inside the graph)"},
            "normalization": {"mean": None if info.mean is None else list(info.mean),
                              "std": None if info.std is None else list(info.std)},
            "model": run.cfg.model.name, "task": run.cfg.task.name, "precision": "fp32",
            "ema": run.state.ema_params is not None}
    return fn, meta


def input_spec(image_shape: Sequence[int], batch: int | None) -> jax.ShapeDtypeStruct:
    """The uint8 image input, batch symbolic (``batch=None``) or fixed."""
    b = jax.export.symbolic_shape("batch")[0] if batch is None else int(batch)
    return jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8)


# -- StableHLO ------------------------------------------------------------------------------------------------
def export_stablehlo(fn: Callable, spec: jax.ShapeDtypeStruct) -> bytes:
    """The serialized :class:`jax.export.Exported` of ``fn`` for inputs like ``spec``."""
    with conv.forced("xla"):  # the CPU matmul path decides by FLOPs, which a symbolic batch leaves open
        exported = jax.export.export(jax.jit(fn))(spec)
    return bytes(exported.serialize())


def stablehlo_runner(blob: bytes) -> Callable[[np.ndarray], list[np.ndarray]]:
    exported = jax.export.deserialize(bytearray(blob))
    call = jax.jit(exported.call)
    return lambda images: [np.asarray(o) for o in call(images)]


# -- ONNX ------------------------------------------------------------------------------------------------------
def _slices_max(x: jax.Array, *, window_dimensions, window_strides, padding, base_dilation, window_dilation):
    """``reduce_window_max`` as the maximum of one strided slice per window offset (None: not expressible)."""
    if any(d != 1 for d in (*base_dilation, *window_dilation)):
        return None
    config = [(int(lo), int(hi), 0) for lo, hi in padding]
    if any(lo or hi for lo, hi, _ in config):
        x = _pad_blocks(x, jnp.array(-jnp.inf, x.dtype), config)
        if x is None:
            return None
    out = None
    for offsets in itertools.product(*(range(w) for w in window_dimensions)):
        limits = [o + ((n - w) // s) * s + 1
                  for o, n, w, s in zip(offsets, x.shape, window_dimensions, window_strides, strict=True)]
        piece = lax.slice(x, offsets, limits, window_strides)
        out = piece if out is None else jnp.maximum(out, piece)
    return out


def _pad_blocks(x: jax.Array, value: jax.Array, config) -> jax.Array | None:
    """``lax.pad`` without interior or negative padding as concatenations with constant blocks (None: other)."""
    if any(interior or lo < 0 or hi < 0 for lo, hi, interior in config):
        return None
    for axis, (lo, hi, _) in enumerate(config):
        def block(n: int, axis: int = axis, like: jax.Array = x) -> jax.Array:
            shape = list(like.shape)
            shape[axis] = n
            return jnp.broadcast_to(jnp.asarray(value, like.dtype), shape)

        parts = [*([block(lo)] if lo else []), x, *([block(hi)] if hi else [])]
        if len(parts) > 1:
            x = lax.concatenate(parts, axis)
    return x


def _dilate(x: jax.Array, axis: int, d: int) -> jax.Array:
    """``x`` with ``d - 1`` zeros between its elements along ``axis`` (an input-dilated convolution's input)."""
    if d == 1:
        return x
    n = x.shape[axis]
    stacked = jnp.stack([x] + [jnp.zeros_like(x)] * (d - 1), axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = n * d
    return lax.slice_in_dim(stacked.reshape(shape), 0, (n - 1) * d + 1, axis=axis)


_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "remat": "jaxpr", "checkpoint": "jaxpr"}


def _rewritten(eqn, invals: list) -> list | None:
    """The outputs of ``eqn`` computed in a form jax2onnx lowers correctly, or None to bind it as it is."""
    name, params = eqn.primitive.name, eqn.params
    if name in _CALLS:  # inline nested calls, so their bodies get the same treatment
        inner = params.get(_CALLS[name])
        if inner is not None:
            if hasattr(inner, "consts"):
                return evaluate_jaxpr(inner.jaxpr, inner.consts, *invals)
            return evaluate_jaxpr(inner, [], *invals)
    if name == "reduce_window_max":
        out = _slices_max(invals[0], **params)
        return None if out is None else [out]
    if name == "pad":
        out = _pad_blocks(invals[0], invals[1], params["padding_config"])
        return None if out is None else [out]
    if name == "conv_general_dilated" and any(int(d) != 1 for d in (params["lhs_dilation"] or ())):
        x = invals[0]
        for axis, d in zip(params["dimension_numbers"].lhs_spec[2:], params["lhs_dilation"], strict=True):
            x = _dilate(x, axis, int(d))
        new = {**params, "lhs_dilation": (1,) * len(params["lhs_dilation"])}
        return [eqn.primitive.bind(x, *invals[1:], **new)]
    return None


def evaluate_jaxpr(jaxpr, consts: Sequence[Any], *args: Any) -> list:
    """Re-play ``jaxpr`` (binding each primitive; nested calls inlined, see :func:`_rewritten`)."""
    from jax.extend.core import Literal

    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        out = _rewritten(eqn, invals)
        if out is None:
            out = eqn.primitive.bind(*invals, **eqn.params)
            out = out if eqn.primitive.multiple_results else [out]
        env.update(zip(eqn.outvars, out, strict=True))
    return [read(v) for v in jaxpr.outvars]


def _jax2onnx():
    try:
        import logging

        import jax2onnx
        for name in ("jax2onnx", "jax2onnx.plugins.plugin_system"):  # it logs every plugin it cannot import
            logging.getLogger(name).setLevel(logging.ERROR)
        return jax2onnx
    except ImportError as exc:
        raise ConfigError(f"format=onnx needs jax2onnx and onnxruntime ({exc}); install them with {EXTRA_HINT}") \
            from None


def export_onnx(fn: Callable, spec: jax.ShapeDtypeStruct, output_names: Sequence[str]) -> bytes:
    """The serialized ONNX model of ``fn`` for inputs like ``spec`` (see the module docstring)."""
    jax2onnx = _jax2onnx()
    with conv.forced("xla"):
        closed = jax.make_jaxpr(fn)(spec)
    try:
        proto = jax2onnx.to_onnx(lambda images: evaluate_jaxpr(closed.jaxpr, closed.consts, images), [spec],
                                 model_name="prism", input_names=[INPUT_NAME], output_names=list(output_names))
    except Exception as exc:
        hint = " (a fixed batch=N may convert)" if not isinstance(spec.shape[0], int) else ""
        raise ConfigError(f"jax2onnx could not convert this model{hint}: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    return _drop_scalar_gemm_bias(proto).SerializeToString()


def _drop_scalar_gemm_bias(proto):
    """Gemm nodes whose bias is a 0-d initializer (jax2onnx gives every dot a scalar zero bias; onnxruntime's
    quantizer cannot read one) get a 1-D bias of the output width instead, or none when it is zero."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in inits:
            continue
        bias = numpy_helper.to_array(inits[node.input[2]])
        if bias.ndim:
            continue
        if not bias.any():
            del node.input[2]
            continue
        weight = inits.get(node.input[1])
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        if weight is None:
            continue
        width = weight.dims[0] if trans_b else weight.dims[1]
        name = f"{node.name or node.output[0]}_bias"
        proto.graph.initializer.append(numpy_helper.from_array(np.full((width,), bias, bias.dtype), name))
        node.input[2] = name
    return proto


def onnx_session(model: bytes | str | Path, threads: int = 0):
    """An onnxruntime CPU session of ``model`` (bytes or a file); ``threads`` intra-op threads (0: default)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError(f"onnxruntime is not installed ({exc}); install it with {EXTRA_HINT}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_runner(model: bytes | str | Path) -> Callable[[np.ndarray], list[np.ndarray]]:
    session = onnx_session(model)
    name = session.get_inputs()[0].name
    return lambda images: [np.asarray(o) for o in session.run(None, {name: images})]


# -- parity -----------------------------------------------------------------------------------------------------
def eval_images(run, count: int) -> np.ndarray:
    """The first ``count`` images of the run's evaluation split (uint8, as stored)."""
    split = run.eval_split
    n = min(count, len(split))
    if n < 1:
        raise ConfigError(f"the evaluation split {run.cfg.dataset.eval_split!r} of {run.cfg.dataset.name!r} is empty")
    return np.stack([np.asarray(split[i]["image"], np.uint8) for i in range(n)])


def run_batched(runner: Callable, images: np.ndarray, batch: int | None) -> list[np.ndarray]:
    """``runner`` over ``images``, at once (``batch=None``) or in fixed batches (the last one padded)."""
    if batch is None:
        return runner(images)
    parts = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs = runner(chunk)
        parts.append([o[:len(o) - pad] for o in outs])
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def compare(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], *, atol: float, rtol: float
            ) -> dict[str, Any]:
    """Per output: max |diff|, its bound ``atol + rtol * max|reference|``, top-1 agreement of 2-D outputs."""
    if len(reference) != len(outputs):
        return {"passed": False, "error": f"{len(outputs)} outputs, JAX gives {len(reference)}"}
    report, passed = [], True
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
        if ref.shape != out.shape:
            return {"passed": False, "error": f"output {i} has shape {out.shape}, JAX gives {ref.shape}"}
        diff = float(np.max(np.abs(ref - out))) if ref.size else 0.0
        bound = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
        entry = {"shape": list(ref.shape), "max_abs_diff": diff, "bound": bound, "passed": bool(diff <= bound)}
        if ref.ndim == 2:
            entry["top1_agreement"] = float(np.mean(ref.argmax(-1) == out.argmax(-1)))
        passed &= entry["passed"] and bool(np.all(np.isfinite(out)))
        report.append(entry)
    return {"passed": passed, "outputs": report}


# -- the command ------------------------------------------------------------------------------------------------
def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"batch must be dynamic or a positive integer, got {text!r}")
    return value


def number_option(options: dict[str, str], key: str, default: float, kind=float, minimum: float = 0.0) -> Any:
    """``options[key]`` as a ``kind`` number >= ``minimum`` (``default`` when absent); else a one-line error."""
    text = options.get(key)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value < minimum or not np.isfinite(value):
        raise ConfigError(f"{key} must be a number >= {minimum}, got {text!r}")
    return value


def parse_options(args: Sequence[str], allowed: Sequence[str], command: str) -> dict[str, str]:
    """``key=value`` arguments; an unknown key or a bare word is a one-line error."""
    options = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"prism {command}: unexpected argument {arg!r}; it takes {', '.join(allowed)} "
                              f"(as key=value)")
        options[key] = value
    if "checkpoint" not in options:
        raise ConfigError(f"prism {command} needs checkpoint=RUN_DIR (the directory of a prism train run)")
    return options


def load(run_dir: str, step: str):
    """The restored run of ``run_dir`` at ``step`` (``prism eval``'s loading: its config, checkpoint and
    normalization), computing in float32; returns ``(run, step restored)``."""
    from prism.framework.evaluate import _existing_run_dir, load_run
    from prism.framework.plugins import load_plugins

    load_plugins()
    if step == "init":
        raise ConfigError("step=init has no trained weights to export: give best, latest or a step number")
    # float32 whatever the run trained in: a bf16 run's master weights are float32, and CPU runtimes want float32
    return load_run(_existing_run_dir(run_dir), ["precision=fp32"], step)


def export(options: dict[str, str]) -> dict[str, Any]:
    """Export and check (see the module docstring); returns the ``export.json`` record (raises ParityError)."""
    fmt = options.get("format", "onnx")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    batch = parse_batch(options.get("batch", "dynamic"))
    images_n = number_option(options, "export.images", 32, int, 1)
    atol = number_option(options, "export.atol", 1e-4)
    rtol = number_option(options, "export.rtol", 1e-4)
    started = time.perf_counter()
    run_dir = Path(options["checkpoint"])
    if fmt == "onnx":
        _jax2onnx()  # before minutes of loading: is the converter there?
    run, step = load(str(run_dir), options.get("step", "best"))
    fn, meta = inference_function(run)
    spec = input_spec(run.info.image_shape, batch)
    folder = f"{fmt}-{step}{'' if batch is None else f'-b{batch}'}"
    out = Path(options.get("out") or run_dir / "export" / folder / f"model{FORMATS[fmt]}")
    images = eval_images(run, images_n)
    reference = [np.asarray(o) for o in jax.jit(fn)(images)]
    names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
    convert_started = time.perf_counter()
    if fmt == "onnx":
        blob = export_onnx(fn, spec, names)
        runner = onnx_runner(blob)
    else:
        blob = export_stablehlo(fn, spec)
        runner = stablehlo_runner(blob)
    convert_s = time.perf_counter() - convert_started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob)
    runner = onnx_runner(out) if fmt == "onnx" else stablehlo_runner(out.read_bytes())  # what was written
    parity = compare(reference, run_batched(runner, images, batch), atol=atol, rtol=rtol)
    record = {
        "format": fmt, "file": str(out), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
        "checkpoint": str(run_dir.absolute()), "step": step, "batch": "dynamic" if batch is None else batch,
        **meta,
        "outputs": [{"name": n, "shape": ["batch", *r.shape[1:]], "dtype": "float32"}
                    for n, r in zip(names, reference, strict=True)],
        "parity": {"images": len(images), "split": run.cfg.dataset.eval_split, "dataset": run.cfg.dataset.name,
                   "atol": atol, "rtol": rtol, "rule": "max|diff| <= atol + rtol * max|jax|", **parity},
        "convert_s": round(convert_s, 3), "wall_s": round(time.perf_counter() - started, 3),
        "versions": _versions(),
    }
    (out.parent / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if not parity["passed"]:
        raise ParityError(_parity_line(record))
    return record


def _parity_line(record: dict) -> str:
    parity = record["parity"]
    if "error" in parity:
        detail = parity["error"]
    else:
        worst = max(parity["outputs"], key=lambda e: e["max_abs_diff"] - e["bound"])
        detail = f"max |diff| {worst['max_abs_diff']:.3g} > bound {worst['bound']:.3g}"
        if "top1_agreement" in worst:
            detail += f", top-1 agreement {worst['top1_agreement']:.1%}"
    return (f"parity check failed: the {record['format']} artifact {record['file']} differs from JAX on "
            f"{parity['images']} evaluation images ({detail}; export.atol={parity['atol']:g} "
            f"export.rtol={parity['rtol']:g}); see {Path(record['file']).parent / EXPORT_FILE}")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def main(args: Sequence[str]) -> int:
    """``prism export checkpoint=RUN format=onnx|stablehlo [step=best] [batch=dynamic|N] [out=FILE]``."""
    options = parse_options(args, OPTIONS, "export")
    try:
        record = export(options)
    except ParityError as exc:
        print(f"prism: error: {exc}", flush=True, file=__import__("sys").stderr)
        return 1
    parity = record["parity"]
    worst = max(e["max_abs_diff"] for e in parity["outputs"])
    top1 = [e["top1_agreement"] for e in parity["outputs"] if "top1_agreement" in e]
    print(f"export: {record['format']} {record['file']} ({record['bytes'] / 1e6:.2f} MB), parity on "
          f"{parity['images']} images: max |diff| {worst:.3g}" + (f", top-1 agreement {top1[0]:.1%}" if top1 else ""))
    return 0
