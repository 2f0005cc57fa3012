"""prism export / quantize / bench infer: ONNX (jax2onnx + onnxruntime) and StableHLO artifacts equal the JAX
function, the parity gate refuses a bad artifact, static int8 quantization inserts QDQ nodes and keeps accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import FAST

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("jax2onnx", reason="the export extra is not installed: pip install -e '.[export]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from prism.framework import export as ex  # noqa: E402
from prism.framework.cli import main as prism  # noqa: E402


class Proc:
    """A command run in this process (the converter's plugin import is paid once per test process)."""

    def __init__(self, capsys, *args: str) -> None:
        capsys.readouterr()
        self.returncode = prism(list(args))
        captured = capsys.readouterr()
        self.stdout, self.stderr = captured.out, captured.err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny trained digits run (simple_cnn, 20 steps: test_eval's run, so its programs come from the cache)."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    run_dir = tmp_path_factory.mktemp("export") / "run"
    cfg = compose(FAST)
    result = Trainer(cfg, run_dir).fit()
    assert result["status"] == "completed"
    return run_dir, result


def _model(name: str, shape, **overrides):
    """A registered model, built abstractly and filled on the host (NumPy; XLA's random kernels compile slowly):
    kernels ~ N(0, 1/fan_in), biases, norm scales and BatchNorm statistics off their defaults (a zero head or unit
    statistics would make a converter that drops them look exact)."""
    import math

    from prism.framework.api import DataInfo
    from prism.framework.plugins import load_plugins
    from prism.framework.registry import MODELS

    load_plugins()
    cfg = MODELS.get(name).config(**overrides)
    model = nnx.eval_shape(lambda: MODELS.build(name, cfg, data=DataInfo(num_classes=5, image_shape=shape),
                                                rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        last = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return np.zeros(leaf.shape, leaf.dtype)
        if last == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        if last == "scale":
            return (1 + 0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
        if leaf.ndim < 2:
            return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
        return rng.normal(0.0, 1 / math.sqrt(math.prod(leaf.shape[:-1])), leaf.shape).astype(leaf.dtype)

    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))
    model.eval()
    return lambda x: tuple(jax.tree.leaves(model(x.astype(jnp.float32) / 255.0)))


ARCHITECTURES = {
    # BatchNorm, a strided space-to-depth stem, padded max pooling, residual adds
    "resnet18": ("resnet18", (32, 32, 3), {"width": 8}),
    # depthwise (grouped) convolutions, ReLU6, dropout in eval mode
    "mobilenet_v2": ("mobilenet_v2", (32, 32, 3), {"width_mult": 0.25}),
    # patch embedding, LayerNorm, multi-head attention, GELU, class token
    "vit": ("vit_ti16", (16, 16, 3), {"patch_size": 8, "image_size": 16, "depth": 1, "embed_dim": 24,
                                      "num_heads": 2}),
    # transposed convolutions (input dilation), skip concatenations, per-pixel logits
    "unet": ("unet", (32, 32, 1), {"padding": "same", "width": 4, "levels": 2, "batch_norm": True}),
    # three raw detection heads
    "yolov3": ("yolov3", (32, 32, 3), {"width": 4, "blocks": [0, 0, 0, 0, 1]}),
}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_onnx_equals_jax_across_architectures(arch):
    name, shape, overrides = ARCHITECTURES[arch]
    fn = _model(name, shape, **overrides)
    images = np.random.default_rng(0).integers(0, 256, (3, *shape), dtype=np.uint8)
    reference = [np.asarray(o) for o in jax.jit(fn)(images)]
    assert max(float(np.abs(r).max()) for r in reference) > 1e-2  # not a trivially zero function
    blob = ex.export_onnx(fn, ex.input_spec(shape, None), [f"out{i}" for i in range(len(reference))])
    session = ex.onnx_session(blob)
    assert session.get_inputs()[0].type == "tensor(uint8)"
    outputs = session.run(None, {"image": images})
    assert len(outputs) == len(reference)
    for ref, out in zip(reference, outputs, strict=True):
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    one = session.run(None, {"image": images[:1]})  # the batch really is dynamic
    np.testing.assert_allclose(one[0], reference[0][:1], atol=1e-4, rtol=1e-4)


def test_rewritten_primitives_equal_lax():
    """The max pooling, padding and input dilation re-expressed for jax2onnx equal lax's own (NumPy reference for
    the dilation)."""
    from jax import lax

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 3)), jnp.float32)
    params = dict(window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1),
                  padding=((0, 0), (1, 1), (1, 1), (0, 0)), base_dilation=(1,) * 4, window_dilation=(1,) * 4)
    np.testing.assert_array_equal(ex._slices_max(x, **params), lax.reduce_window(
        x, -jnp.inf, lax.max, params["window_dimensions"], params["window_strides"], params["padding"]))
    config = [(0, 0, 0), (2, 1, 0), (0, 3, 0), (0, 0, 0)]
    np.testing.assert_array_equal(ex._pad_blocks(x, jnp.float32(-1.5), config), lax.pad(x, jnp.float32(-1.5), config))
    dilated = np.zeros((2, 13, 6, 3), np.float32)
    dilated[:, ::2] = np.asarray(x)
    np.testing.assert_array_equal(ex._dilate(x, 1, 2), dilated)


def test_export_both_formats_with_parity_record(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    proc = Proc(capsys, "export", f"checkpoint={run_dir}", "format=stablehlo", f"out={tmp_path}/s/model.stablehlo")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "s" / "export.json").read_text())
    assert record["parity"]["passed"] and record["parity"]["images"] == 32
    assert record["input"]["dtype"] == "uint8" and record["normalization"]["mean"] is not None
    # the artifact reloads in plain JAX, without prism's model code, and equals the run's evaluation logits
    exported = jax.export.deserialize(bytearray((tmp_path / "s" / "model.stablehlo").read_bytes()))
    run, _ = ex.load(str(run_dir), "best")
    images = ex.eval_images(run, 5)
    fn, _ = ex.inference_function(run)
    np.testing.assert_allclose(np.asarray(exported.call(images)[0]), np.asarray(jax.jit(fn)(images)[0]),
                               atol=1e-5)

    proc = Proc(capsys, "export", f"checkpoint={run_dir}", "format=onnx", "batch=4", f"out={tmp_path}/o/m.onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "o" / "export.json").read_text())
    parity = record["parity"]["outputs"][0]
    assert record["batch"] == 4 and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    assert ex.onnx_session(tmp_path / "o" / "m.onnx").get_inputs()[0].shape == [4, 8, 8, 1]


def test_parity_gate_refuses(digits_run, tmp_path, capsys):
    """An absurdly small tolerance must fail the export: exit 1, one line, the numbers kept in export.json."""
    run_dir, _ = digits_run
    proc = Proc(capsys, "export", f"checkpoint={run_dir}", "format=onnx", "export.atol=0", "export.rtol=0",
                "export.images=8", f"out={tmp_path}/model.onnx")
    record = json.loads((tmp_path / "export.json").read_text())
    assert not record["parity"]["passed"] and record["parity"]["outputs"][0]["max_abs_diff"] > 0
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("prism:")]
    assert len(lines) == 1 and "parity check failed" in lines[0] and "export.atol=0" in lines[0]


def test_parity_compare_rule():
    ref = [np.array([[0.0, 2.0], [1.0, -1.0]])]
    ok = ex.compare(ref, [ref[0] + 1e-5], atol=1e-4, rtol=0)
    assert ok["passed"] and ok["outputs"][0]["top1_agreement"] == 1.0
    bad = ex.compare(ref, [np.array([[3.0, 2.0], [1.0, -1.0]])], atol=1e-4, rtol=1e-4)
    assert not bad["passed"] and bad["outputs"][0]["top1_agreement"] == 0.5
    assert bad["outputs"][0]["max_abs_diff"] == 3.0 and bad["outputs"][0]["bound"] == pytest.approx(1e-4 + 2e-4)
    assert not ex.compare(ref, [np.zeros((2, 3))], atol=1, rtol=1)["passed"]  # shape mismatch


def test_bad_input_is_one_line(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    for args, needle in ((["format=tflite"], "format must be one of onnx, stablehlo"),
                         (["batch=0"], "batch must be dynamic or a positive integer"),
                         (["bogus=1"], "unexpected argument 'bogus=1'")):
        proc = Proc(capsys, "export", f"checkpoint={run_dir}", *args)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-1500:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = Proc(capsys, "export", f"checkpoint={tmp_path}/nowhere", "format=onnx")
    assert proc.returncode == 2 and "no such run directory" in proc.stderr
    proc = Proc(capsys, "bench", "infer", f"checkpoint={tmp_path}/none.onnx")
    assert proc.returncode == 2 and "no such run directory or model file" in proc.stderr


def test_quantize_static_int8(digits_run, tmp_path, capsys):
    """QDQ int8 with per-channel weights: Quantize/DequantizeLinear nodes and int8 weights in the file, accuracy
    within 5 points of fp32 on the 360 test digits (a 20-step model), the accuracies recomputed here from the files."""
    import onnx

    run_dir, result = digits_run
    proc = Proc(capsys, "quantize", f"checkpoint={run_dir}", "calibration=64", "quantize.iters=5", f"out={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "quantize.json").read_text())
    m = record["metrics"]
    assert record["int8_nodes"]["QuantizeLinear"] > 0 and record["int8_nodes"]["DequantizeLinear"] > 0
    model = onnx.load(str(tmp_path / "model-int8.onnx"))
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in model.graph.initializer)
    assert m["fp32_accuracy"] == pytest.approx(result["metrics"]["eval/accuracy"], abs=1e-6)
    assert m["jax_accuracy"] == m["fp32_accuracy"] and abs(m["int8_minus_fp32_points"]) <= 5
    files = {k: (tmp_path / f"model-{k}.onnx").stat().st_size / 1e6 for k in ("fp32", "int8")}
    assert {k: record["files"][k]["mb"] for k in files} == pytest.approx(files, rel=1e-3)  # the files as written
    latency = record["latency_batch1_cpu"]["int8"]
    assert 0 < latency["median_ms"] <= latency["p95_ms"] < 1e4
    run, _ = ex.load(str(run_dir), "best")
    images = np.stack([np.asarray(e["image"]) for e in run.eval_split])
    labels = np.array([int(e["label"]) for e in run.eval_split])
    int8 = ex.onnx_session(tmp_path / "model-int8.onnx").run(None, {"image": images})[0]
    assert float(np.mean(int8.argmax(-1) == labels)) == pytest.approx(m["int8_accuracy"])


def test_bench_infer_writes_its_file(digits_run, tmp_path, capsys):
    run_dir, _ = digits_run
    out = tmp_path / "bench.json"
    proc = Proc(capsys, "bench", "infer", f"checkpoint={run_dir}", "batch=1,4", "bench.iters=3", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())
    rows = {(r["engine"], r["batch"]) for r in record["results"]}
    assert rows == {("jax", 1), ("jax", 4), ("onnxruntime", 1), ("onnxruntime", 4)}
    for r in record["results"]:
        assert 0 < r["median_ms"] <= r["p95_ms"] and r["images_per_s"] == pytest.approx(r["batch"] / r["median_ms"]
                                                                                         * 1e3)
