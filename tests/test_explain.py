"""Explainers (``prism explain``, the ``explain_faithfulness`` task) against independent references: integrated
gradients' completeness, Grad-CAM / Grad-CAM++ against NumPy on a tiny model, attention rollout and deletion /
insertion AUC against NumPy, the model-randomization sanity check (Adebayo et al. 2018), and the command on a tiny
trained run (PNG + npy written; bad input refused in one line)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from prism.framework.api import DataInfo, InputSpace
from prism.framework.explain import build_explainer
from prism.framework.registry import EXPLAINERS, MODELS
from prism.framework.taps import tap
from prism.plugins.explainers.rollout import attention_rollout
from prism.plugins.tasks.explain_faithfulness import faithfulness_aucs

UNIT = InputSpace(black=(0.0,), white=(1.0,))


class TinyTapped(nnx.Module):
    """3x3 conv (2 -> 3 channels, SAME) -> ReLU -> tap 'feat' -> tanh -> global mean -> linear: small enough that
    its activations and gradients have closed forms in NumPy."""

    tap_layers = ("feat",)

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(3, 4, rngs=rngs)

    def __call__(self, x):
        a = tap("feat", nnx.relu(self.conv(x)))
        return self.head(jnp.tanh(a).mean(axis=(1, 2)))


def _numpy_conv_same(x, kernel, bias):
    """(B, H, W, Cin) * (3, 3, Cin, Cout) 'SAME' cross-correlation, as flax's Conv computes it."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((b, h, w, kernel.shape[-1]))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("bhwc,co->bhwo", padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
    return out + bias


def test_gradcam_and_gradcam_pp_equal_a_numpy_reference_on_a_tiny_model():
    model = TinyTapped(rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 6, 5, 2)))
    target = np.array([1, 3])
    kernel, bias = np.asarray(model.conv.kernel[...]), np.asarray(model.conv.bias[...])
    w_head = np.asarray(model.head.kernel[...])
    a = np.maximum(_numpy_conv_same(x, kernel, bias), 0)  # the tapped activation
    # score = sum_k W[k, t] * mean_ij tanh(A_kij) + b_t  =>  dS/dA_kij = W[k, t] (1 - tanh^2 A_kij) / (h w)
    g = w_head[:, target].T[:, None, None, :] * (1 - np.tanh(a) ** 2) / (6 * 5)
    cam = np.maximum((g.mean(axis=(1, 2), keepdims=True) * a).sum(-1), 0)
    alpha = np.where(g != 0, g**2 / (2 * g**2 + a.sum(axis=(1, 2), keepdims=True) * g**3 + 1e-7), 0)
    cam_pp = np.maximum(((alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True) * a).sum(-1), 0)

    score = lambda z: model(z)[jnp.arange(2), target]  # noqa: E731
    for method, reference in (("gradcam", cam), ("gradcam_pp", cam_pp)):
        explainer, _ = build_explainer(method)
        maps = jax.jit(lambda z, e=explainer: e.explain(model, score, z, layer="feat", key=jax.random.key(0),
                                                          space=UNIT))(x)
        assert maps.shape == (2, 6, 5)
        assert reference.max() > 0
        np.testing.assert_allclose(np.asarray(maps), reference, rtol=1e-4, atol=1e-6, err_msg=method)


@pytest.fixture(scope="module")
def tiny_vit():
    info = DataInfo(num_classes=3, image_shape=(8, 12, 3))
    entry = MODELS.get("vit_ti16")
    vit = entry.builder(entry.config(patch_size=4, embed_dim=16, depth=2, num_heads=2), data=info, rngs=nnx.Rngs(0))
    vit.eval()
    return vit


def test_integrated_gradients_are_complete_at_64_steps(tiny_vit):
    """sum of attributions = f(x) - f(baseline) within 1 % (Sundararajan et al.'s completeness axiom), on a tiny ViT
    (smooth: GELU, softmax, LayerNorm) with normalized inputs, from the black baseline."""
    baseline = "black"
    from prism.plugins.explainers.ig import baseline_images

    space = InputSpace.of(DataInfo(num_classes=3, image_shape=(8, 12, 3), mean=(0.5,) * 3, std=(0.25,) * 3))
    x = (jax.random.uniform(jax.random.key(2), (4, 8, 12, 3)) - 0.5) / 0.25
    target = jnp.argmax(tiny_vit(x), axis=-1)
    score = lambda z: tiny_vit(z)[jnp.arange(4), target]  # noqa: E731
    explainer, cfg = build_explainer("ig", {"steps": 64, "baseline": baseline})
    maps = jax.jit(lambda z: explainer.explain(tiny_vit, score, z, layer=None, key=jax.random.key(0), space=space))(x)
    gap = np.asarray(score(x) - score(baseline_images(x, baseline, space, cfg.blur_sigma)))
    assert maps.shape == (4, 8, 12) and np.all(np.abs(gap) > 1e-3)
    np.testing.assert_allclose(np.asarray(maps).sum(axis=(1, 2)), gap, rtol=0.01)


def _numpy_rollout(weights, fusion="mean", discard=0.0):
    result = None
    for w in weights:
        a = {"mean": np.mean, "max": np.max, "min": np.min}[fusion](w, axis=1)
        if discard:
            for i in range(a.shape[0]):
                flat = a[i].reshape(-1).copy()
                drop = np.argsort(flat, kind="stable")[:int(flat.size * discard)]
                keep = np.ones_like(flat)
                keep[drop] = 0
                keep = keep.reshape(a[i].shape)
                keep[:, 0] = 1
                a[i] = a[i] * keep
        a = 0.5 * a + 0.5 * np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else a @ result
    return result


@pytest.mark.parametrize("fusion,discard", [("mean", 0.0), ("max", 0.3)])
def test_attention_rollout_equals_numpy_on_given_attention_matrices(fusion, discard):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 2, 3, 5, 5))  # layers, batch, heads, tokens, tokens
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ours = jax.jit(lambda w: attention_rollout(list(w), fusion, discard))(jnp.asarray(weights, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), _numpy_rollout(weights, fusion, discard), rtol=1e-5, atol=1e-6)


def test_rollout_of_a_vit_is_the_class_token_row_of_its_tapped_attention(tiny_vit):
    vit = tiny_vit
    x = jax.random.normal(jax.random.key(3), (2, 8, 12, 3))
    from prism.framework.taps import captured

    rollout, gradcam = build_explainer("rollout")[0], build_explainer("gradcam")[0]

    @jax.jit
    def run(z):
        _, seen = captured(lambda: vit(z), vit.attention_layers)
        score = lambda v: vit(v)[:, 0]  # noqa: E731
        return ([seen[n] for n in vit.attention_layers],
                rollout.explain(vit, score, z, layer=None, key=jax.random.key(0), space=UNIT),
                gradcam.explain(vit, score, z, layer="tokens1", key=jax.random.key(0), space=UNIT))

    weights, maps, cam = run(x)
    weights = [np.asarray(w) for w in weights]
    assert weights[0].shape == (2, 2, 7, 7)  # 1 class token + a 2 x 3 patch grid
    np.testing.assert_allclose(weights[0].sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(maps), _numpy_rollout(weights)[:, 0, 1:].reshape(2, 2, 3), rtol=1e-5)
    assert cam.shape == (2, 2, 3) and float(cam.max()) > 0  # Grad-CAM on the patch tokens


def _numpy_aucs(probability, x, maps, steps, sigma):
    """Deletion and insertion AUC (Petsiuk et al.) of one image, written plainly: pixels by descending map value."""
    h, w = maps.shape
    order = np.argsort(-maps.reshape(-1), kind="stable")
    blurred = np.stack([gaussian_filter(x[..., c], sigma, mode="nearest", truncate=3.0) for c in range(x.shape[-1])],
                       -1)
    deletion, insertion = [], []
    for k in range(steps + 1):
        chosen = np.zeros(h * w, bool)
        chosen[order[:int(np.round(k * h * w / steps))]] = True
        chosen = chosen.reshape(h, w, 1)
        deletion.append(probability(np.where(chosen, 0.0, x)))
        insertion.append(probability(np.where(chosen, x, blurred)))
    trapezoid = lambda v: sum((v[i] + v[i + 1]) / 2 for i in range(steps)) / steps  # noqa: E731
    return trapezoid(deletion), trapezoid(insertion)


def test_deletion_and_insertion_auc_equal_a_numpy_reference():
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(5 * 6 * 2, 3)), rng.normal(size=3)
    x = rng.normal(size=(2, 5, 6, 2)).astype(np.float32)
    maps = rng.uniform(size=(2, 5, 6)).astype(np.float32)
    target = np.array([0, 2])

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    def probability(images):
        logits = images.reshape(images.shape[0], -1) @ jnp.asarray(weight, jnp.float32) + bias
        return jax.nn.softmax(logits, -1)[jnp.arange(images.shape[0]), target]

    deletion, insertion = jax.jit(lambda a, m: faithfulness_aucs(probability, a, m, steps=7, blur_sigma=1.0))(
        jnp.asarray(x), jnp.asarray(maps))
    for i in range(2):
        ref = _numpy_aucs(lambda im, i=i: softmax(im.reshape(-1) @ weight + bias)[target[i]], x[i], maps[i], 7, 1.0)
        np.testing.assert_allclose([deletion[i], insertion[i]], ref, rtol=1e-4)


# -- a tiny trained run: the command, the task, the randomization check ------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A simple_cnn trained briefly on digits (8x8), its checkpoint saved, and two digit images as PNG files."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from prism.framework.config import compose
    from prism.framework.train import Trainer

    root = tmp_path_factory.mktemp("explain")
    cfg = compose(["train.steps=200", "train.batch_size=32", "train.eval_every=200", "logging.progress=false",
                   "model.widths=[8,16]", "checkpoint.async_save=false", "logging.plots=false",
                   "logging.tensorboard=false", "optimizer.lr=1e-2"])
    result = Trainer(cfg, root / "run").fit()
    images = root / "images"
    images.mkdir()
    digits = load_digits()
    for i in (0, 1):
        Image.fromarray((digits.images[-1 - i] * 255 / 16).astype(np.uint8)).save(images / f"digit{i}.png")
    return root / "run", images, result


def test_explain_writes_overlay_pngs_and_raw_maps(trained_run, tmp_path, capsys):
    from prism.framework.cli import main

    run_dir, images, result = trained_run
    assert result["metrics"]["eval/accuracy"] > 0.7
    code = main(["explain", f"checkpoint={run_dir}", f"input={images}", "method=ig", "method.steps=16",
                 f"out={tmp_path / 'ig'}"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "ig" / "explanations.json").read_text())
    assert record["method"] == "ig" and record["settings"]["steps"] == 16 and len(record["images"]) == 2
    for image in record["images"]:
        saliency = np.load(tmp_path / "ig" / image["map"])
        assert saliency.shape == (8, 8) and np.isfinite(saliency).all() and np.abs(saliency).max() > 0
        assert (tmp_path / "ig" / image["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert image["class"] == image["predicted"] and 0 < image["prob"] <= 1
    code = main(["explain", f"checkpoint={run_dir}", f"input={images / 'digit0.png'}", "method=gradcam",
                 "layer=stage1", "target=3", f"out={tmp_path / 'cam'}"])
    assert code == 0
    (image,) = json.loads((tmp_path / "cam" / "explanations.json").read_text())["images"]
    assert image["class"] == 3 and np.load(tmp_path / "cam" / image["map"]).shape == (8, 8)


@pytest.mark.parametrize("args,message", [
    (["method=gradcm"], "unknown explainer 'gradcm'. Did you mean: gradcam"),
    (["method=gradcam", "layer=stage9"], "unknown layer 'stage9' of model SimpleCNN. Did you mean: stage2, stage1? "
                                          "Layers: stage1, stage2"),
    (["method=rollout"], "method 'rollout' needs a model with attention_layers (AttentionModel); model 'simple_cnn'"),
    (["method=ig", "method.stepz=3"], "unknown setting method.stepz of explainer 'ig'. Did you mean: method.steps?"),
    (["method=ig", "method.steps=0"], "method.steps must be >= 1, got 0"),
    (["method=gradcam", "target=cat"], "target must be pred, a class index in [0, 10)"),
])
def test_bad_input_is_one_line_naming_it(trained_run, tmp_path, capsys, args, message):
    from prism.framework.cli import main

    run_dir, images, _ = trained_run
    code = main(["explain", f"checkpoint={run_dir}", f"input={images}", *args, f"out={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_missing_input_file_is_one_line(trained_run, tmp_path, capsys):
    from prism.framework.cli import main

    run_dir, _, _ = trained_run
    code = main(["explain", f"checkpoint={run_dir}", f"input={tmp_path / 'nope.png'}", "method=gradcam"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"prism: error: input={tmp_path / 'nope.png'}: no such image file or folder"


def test_maps_of_a_randomized_model_differ(trained_run):
    """Adebayo et al.'s model-randomization check: the maps of the trained model and of the same architecture with
    random weights have low rank correlation (a method that ignored the weights, edge detection, would not)."""
    from prism.framework.evaluate import load_run
    from prism.framework.steps import evaluation_system, prepare_images
    from prism.framework.taps import choose_layer

    run_dir, _, _ = trained_run
    run, _ = load_run(run_dir, step="latest")
    trained = evaluation_system(run.state, run.eval_graphdef, jnp.float32).model
    random = MODELS.get("simple_cnn").builder(MODELS.get("simple_cnn").config(widths=[8, 16]), data=run.info,
                                              rngs=nnx.Rngs(123))
    random.eval()
    x = prepare_images({"image": jnp.stack([jnp.asarray(run.split("test")[i]["image"]) for i in range(16)])},
                       run.info, jnp.float32)["image"]
    target = jnp.argmax(trained(x), axis=-1)
    for method, settings in (("gradcam", {}), ("smoothgrad", {"samples": 4})):
        explainer, _ = build_explainer(method, settings)
        maps = []
        for model in (trained, random):
            score = lambda z, m=model: m(z)[jnp.arange(16), target]  # noqa: E731
            layer = choose_layer(model, "") if explainer.uses_layer else None
            maps.append(np.asarray(jax.jit(lambda z, m=model, s=score, e=explainer, name=layer: e.explain(
                m, s, z, layer=name, key=jax.random.key(0), space=InputSpace.of(run.info)))(x)))
        rho = [spearmanr(a.reshape(-1), b.reshape(-1))[0] for a, b in zip(*maps, strict=True)]
        same = [spearmanr(a.reshape(-1), a.reshape(-1) + 1e-3 * np.abs(a).max())[0] for a in maps[0]]
        assert np.nanmean(rho) < 0.5, (method, rho)
        assert np.allclose(same, 1)


def test_faithfulness_task_reports_method_and_random_aucs(trained_run, tmp_path):
    from prism.framework.evaluate import evaluate_run

    run_dir, _, _ = trained_run
    result = evaluate_run(run_dir, ["task=explain_faithfulness", "task.steps=4", "train.max_eval_batches=1",
                                    "train.eval_batch_size=32"], step="latest", out_dir=tmp_path)
    m = result["metrics"]
    for name in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
        assert 0 <= m[f"eval/{name}"] <= 1, name
    assert m["eval/deletion_auc"] < m["eval/random_deletion_auc"]  # a trained model's Grad-CAM beats random maps
    assert result["task_settings"]["method"] == "gradcam"


def test_every_explainer_is_listed_and_described():
    assert {"gradcam", "gradcam_pp", "ig", "smoothgrad", "rollout"} <= set(EXPLAINERS.names())
    assert all(EXPLAINERS.get(n).description for n in EXPLAINERS.names())


@pytest.mark.parametrize("name,settings", [
    ("resnet18", {"stem": "cifar", "width": 4}), ("vgg11", {"hidden": 8}), ("simple_cnn", {"widths": [4, 8]}),
    ("mobilenet_v2", {"width_mult": 0.25}), ("densenet121", {"growth_rate": 4, "block_config": [1, 1, 1, 1],
                                                            "num_init_features": 8}),
    ("vit_ti16", {"patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}),
])
def test_every_declared_layer_is_tapped_as_a_feature_map(name, settings):
    """Each built-in CNN (and the ViT) taps every layer it declares, as a (batch, h, w, channels) map, shrinking
    down the network; traced abstractly (nothing compiled)."""
    from prism.framework.taps import captured

    info = DataInfo(num_classes=3, image_shape=(32, 32, 3))
    entry = MODELS.get(name)
    declared = []

    def forward(x):
        model = entry.builder(entry.config(**settings), data=info, rngs=nnx.Rngs(0))
        model.eval()
        declared.extend(model.tap_layers)
        return captured(lambda: model(x), model.tap_layers)[1]

    shapes = jax.eval_shape(forward, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert declared and set(shapes) == set(declared)
    grids = [shapes[n].shape for n in declared]
    assert all(len(s) == 4 and s[0] == 2 for s in grids), grids
    assert all(a[1] >= b[1] for a, b in zip(grids, grids[1:], strict=False)), grids  # in forward order
