"""Pretrained weights (``model.pretrained=PATH``): PyTorch state dicts through each model's converter, prism runs,
and the errors a wrong file gives.

The file-format and error tests need no torch: their state dicts are made in NumPy under torchvision's names
and written with safetensors' NumPy API; what each tensor must become in the model (OIHW -> HWIO, transposed
Linear, BatchNorm running statistics) is spelled out here, independently of the converter. The parity tests
(``pip install -e ".[test,torch]"``) compare our logits with torchvision's / timm's on the same input for randomly
initialised torch models saved to disk (no download).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAST, REPO, read_result
from flax import nnx
from safetensors.numpy import save_file

from prism.framework.api import DataInfo
from prism.framework.model_summary import count_params
from prism.framework.pretrained import WeightsError, load_pretrained, weight_variables
from prism.framework.registry import MODELS

TINY_RESNET = dict(depth=18, stem="imagenet", width=4)  # torchvision names and layout, 4-wide


def _config(name: str, **overrides):
    return dataclasses.replace(MODELS.get(name).default_config(), **overrides)


def _abstract(name: str, data: DataInfo, **overrides) -> nnx.Module:
    return nnx.eval_shape(lambda: MODELS.build(name, _config(name, **overrides), data=data, rngs=nnx.Rngs(0)))


def _resnet_state_dict(classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A torchvision resnet18 state dict at width 4 (3 input channels), in NumPy: names and OIHW layouts as
    ``torchvision.models.resnet18().state_dict()``."""
    rng = np.random.default_rng(seed)
    w = TINY_RESNET["width"]
    sd: dict[str, np.ndarray] = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = rng.normal(size=(cout, cin, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.normal(size=c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.normal(size=c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", w, 3, 7)
    bn("bn1", w)
    cin = w
    for i in range(4):
        planes = w * 2**i
        for j in range(2):
            p = f"layer{i + 1}.{j}"
            conv(f"{p}.conv1", planes, cin, 3)
            bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3)
            bn(f"{p}.bn2", planes)
            if j == 0 and i > 0:
                conv(f"{p}.downsample.0", planes, cin, 1)
                bn(f"{p}.downsample.1", planes)
            cin = planes
    sd["fc.weight"] = rng.normal(size=(classes, cin)).astype(np.float32)
    sd["fc.bias"] = rng.normal(size=classes).astype(np.float32)
    return sd


def _save(tmp_path, sd: dict[str, np.ndarray], name: str = "resnet18.safetensors"):
    path = tmp_path / name
    save_file(sd, str(path))
    return path


# -- torchvision names from NumPy/safetensors (no torch) --------------------------------------------------
def test_safetensors_state_dict_fills_every_tensor_in_our_layout(tmp_path):
    sd = _resnet_state_dict(classes=10)
    path = _save(tmp_path, sd)
    model = _abstract("resnet18", DataInfo(10, (32, 32, 3)), **TINY_RESNET)

    report = load_pretrained(model, "resnet18", path)

    assert report.loaded == len([k for k in sd if not k.endswith("num_batches_tracked")]) == 102
    assert not report.head_skipped
    np.testing.assert_array_equal(model.conv1.kernel[...], sd["conv1.weight"].transpose(2, 3, 1, 0))  # OIHW->HWIO
    block = model.stages[1][0]
    np.testing.assert_array_equal(block.conv2.kernel[...][1, 2, 3, 4], sd["layer2.0.conv2.weight"][4, 3, 1, 2])
    downsample = sd["layer2.0.downsample.0.weight"]
    np.testing.assert_array_equal(block.downsample.conv.kernel[...][0, 0], downsample[:, :, 0, 0].T)
    np.testing.assert_array_equal(block.downsample.bn.mean[...], sd["layer2.0.downsample.1.running_mean"])
    np.testing.assert_array_equal(block.bn1.var[...], sd["layer2.0.bn1.running_var"])
    np.testing.assert_array_equal(block.bn1.scale[...], sd["layer2.0.bn1.weight"])
    np.testing.assert_array_equal(block.bn1.bias[...], sd["layer2.0.bn1.bias"])
    np.testing.assert_array_equal(model.head.kernel[...], sd["fc.weight"].T)
    np.testing.assert_array_equal(model.head.bias[...], sd["fc.bias"])
    assert all(isinstance(v.get_value(), jax.Array) for v in weight_variables(model).values())  # nothing left abstract


def test_safetensors_import_does_not_need_torch(tmp_path):
    path = _save(tmp_path, _resnet_state_dict(classes=10))
    script = f"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError, as without torch installed
from flax import nnx
from prism.framework.api import DataInfo
from prism.framework.registry import MODELS
from prism.framework.pretrained import load_pretrained
cfg = MODELS.get("resnet18").default_config()
cfg.width = 4
model = nnx.eval_shape(lambda: MODELS.build("resnet18", cfg, data=DataInfo(10, (32, 32, 3)), rngs=nnx.Rngs(0)))
print(load_pretrained(model, "resnet18", {str(path)!r}).loaded)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["102"]


def test_head_for_another_number_of_classes_is_left_at_init(tmp_path):
    sd = _resnet_state_dict(classes=10)
    model = _abstract("resnet18", DataInfo(7, (32, 32, 3)), **TINY_RESNET)
    model = nnx.merge(*_concrete(model))
    head_before = np.asarray(model.head.kernel[...])

    report = load_pretrained(model, "resnet18", _save(tmp_path, sd))

    assert report.loaded == 100
    assert report.head_skipped == ("the file's 'fc.weight' has shape (10, 32), this model's head needs (7, 32): "
                                   "another number of classes")
    assert "head left at its initialisation" in report.summary()
    np.testing.assert_array_equal(model.head.kernel[...], head_before)
    np.testing.assert_array_equal(model.bn1.mean[...], sd["bn1.running_mean"])

    del sd["fc.weight"], sd["fc.bias"]  # a backbone-only file (timm num_classes=0)
    model = nnx.merge(*_concrete(_abstract("resnet18", DataInfo(10, (32, 32, 3)), **TINY_RESNET)))
    report = load_pretrained(model, "resnet18", _save(tmp_path, sd, "backbone.safetensors"))
    assert report.head_skipped == "the file has no head tensors" and report.loaded == 100


def _concrete(model: nnx.Module):
    """``(graphdef, state)`` with 0.5 / fixed keys where the model has only shapes (no RNG kernels to compile)."""
    graphdef, state = nnx.split(model)

    def fill(x):
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0) if not x.shape else jax.random.split(jax.random.key(0), x.shape)
        return jnp.full(x.shape, 0.5, x.dtype)

    return graphdef, jax.tree.map(fill, state)


@pytest.mark.parametrize("change, expected", [
    (lambda sd: sd.pop("layer3.1.bn2.running_var"),
     r"resnet18\.safetensors: tensor 'layer3\.1\.bn2\.running_var' \(expected shape \(16,\), for model 'resnet18''s "
     r"stages\.2\.1\.bn2\.var\) is missing from the file"),
    (lambda sd: sd.update({"layer2.0.conv1.weight": np.zeros((8, 4, 5, 5), np.float32)}),
     r"resnet18\.safetensors: tensor 'layer2\.0\.conv1\.weight' has shape \(8, 4, 5, 5\), but model 'resnet18''s "
     r"stages\.1\.0\.conv1\.kernel needs \(8, 4, 3, 3\)"),
    (lambda sd: sd.update({"layer4.2.conv1.weight": np.zeros((32, 32, 3, 3), np.float32)}),
     r"the file holds tensor 'layer4\.2\.conv1\.weight' \(shape \(32, 32, 3, 3\)\), which model 'resnet18' does not "
     r"use"),
])
def test_missing_or_mismatched_tensor_is_named_with_its_expected_shape_and_file(tmp_path, change, expected):
    sd = _resnet_state_dict(classes=10)
    change(sd)
    model = nnx.merge(*_concrete(_abstract("resnet18", DataInfo(10, (32, 32, 3)), **TINY_RESNET)))
    with pytest.raises(WeightsError, match=expected):
        load_pretrained(model, "resnet18", _save(tmp_path, sd))
    assert float(model.conv1.kernel[...].min()) == 0.5  # checked before assigning: nothing was loaded


def test_unreadable_or_absent_files_and_models_without_a_converter(tmp_path):
    model = _abstract("resnet18", DataInfo(10, (32, 32, 3)), **TINY_RESNET)
    with pytest.raises(WeightsError, match=r"pretrained weight file .*nowhere\.safetensors does not exist"):
        load_pretrained(model, "resnet18", tmp_path / "nowhere.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"cannot read .*bad\.safetensors as safetensors"):
        load_pretrained(model, "resnet18", bad)
    with pytest.raises(WeightsError, match=r"unknown weight file type 'w\.h5'"):
        (tmp_path / "w.h5").write_bytes(b"")
        load_pretrained(model, "resnet18", tmp_path / "w.h5")
    with pytest.raises(WeightsError, match=r"no checkpoint"):
        load_pretrained(model, "resnet18", tmp_path)  # a directory that is no prism run
    cnn = _abstract("simple_cnn", DataInfo(10, (8, 8, 1)))
    with pytest.raises(WeightsError, match="model 'simple_cnn' has no converter for PyTorch weights"):
        load_pretrained(cnn, "simple_cnn", _save(tmp_path, {"x": np.zeros(1, np.float32)}))


def test_stem_config_that_torchvision_lacks_is_refused(tmp_path):
    model = _abstract("resnet18", DataInfo(10, (32, 32, 3)), **{**TINY_RESNET, "stem": "cifar"})
    with pytest.raises(WeightsError, match=r"'conv1\.weight' has shape \(4, 3, 7, 7\), but .* needs \(4, 3, 3, 3\)"):
        load_pretrained(model, "resnet18", _save(tmp_path, _resnet_state_dict(classes=10)))


def test_legacy_densenet_names_are_renamed():
    from prism.plugins.models.densenet import torch_rename

    layer = "features.denseblock2.denselayer11"
    assert torch_rename(f"{layer}.norm.1.running_var") == f"{layer}.norm1.running_var"
    assert torch_rename(f"{layer}.conv.2.weight") == f"{layer}.conv2.weight"
    for key in ("features.denseblock1.denselayer1.norm1.weight", "features.transition1.norm.weight", "classifier.bias"):
        assert torch_rename(key) == key


# -- through the Trainer --------------------------------------------------------------------------------
VIT = ["model=vit_ti16", "model.depth=1", "model.embed_dim=16", "model.num_heads=2", "model.patch_size=4"]


def _timm_vit_state_dict(classes: int, d: int = 16, channels: int = 1, patch: int = 4, tokens: int = 5):
    """timm ``vit_*`` names and layouts (Linear weights (out, in), patch conv OIHW) for one block, in NumPy."""
    rng = np.random.default_rng(1)
    f = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    sd = {"cls_token": f(1, 1, d), "pos_embed": f(1, tokens, d),
          "patch_embed.proj.weight": f(d, channels, patch, patch), "patch_embed.proj.bias": f(d),
          "norm.weight": f(d), "norm.bias": f(d), "head.weight": f(classes, d), "head.bias": f(classes)}
    for name, shape in (("norm1", None), ("norm2", None), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                        ("mlp.fc1", (4 * d, d)), ("mlp.fc2", (d, 4 * d))):
        sd[f"blocks.0.{name}.weight"] = f(*(shape or (d,)))
        sd[f"blocks.0.{name}.bias"] = f((shape or (d,))[0])
    return sd


def test_trainer_starts_from_a_safetensors_file_and_records_it(tmp_path):
    sd = _timm_vit_state_dict(classes=10)  # digits: 8x8x1 images, 10 classes
    path = _save(tmp_path, sd, "vit.safetensors")
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    fast = [o for o in FAST if not o.startswith("model.")]  # FAST sizes the default simple_cnn
    overrides = [*fast, *VIT, f"model.pretrained={path}", "train.steps=2", "train.max_eval_batches=1"]
    trainer = Trainer(compose(overrides), tmp_path / "run")
    params = trainer.state.params["model"]
    np.testing.assert_array_equal(params["blocks"][0]["attn"]["qkv"]["kernel"][...], sd["blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["patch_embed"]["kernel"][...],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["pos_embed"][...], sd["pos_embed"])
    np.testing.assert_array_equal(params["head"]["kernel"][...], sd["head.weight"].T)
    result = trainer.fit()
    assert result["status"] == "completed"
    assert result["pretrained"] == {"path": str(path), "loaded": 20, "head_skipped": ""}
    assert read_result(tmp_path / "run")["pretrained"]["loaded"] == 20
    path.unlink()  # a run that resumes takes its weights from its checkpoint: the file is no longer needed
    assert Trainer(compose(overrides), tmp_path / "run").pretrained is None


def test_fine_tune_from_a_prism_run_loads_its_model_and_reinitialises_another_head(tmp_path, train_run):
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    first, _ = train_run(["model.widths=[8,16]", "train.ema_decay=0.5"], run_dir=tmp_path / "pretrain")
    trained = jax.device_get(first.state.ema_params["model"])  # a run with an EMA is loaded from its EMA weights
    stats = jax.device_get(first.state.rest["model"])

    second = Trainer(compose([*FAST, "model.widths=[8,16]", "model.num_classes=4",
                              f"model.pretrained={tmp_path / 'pretrain'}"]), tmp_path / "finetune")
    params, rest = jax.device_get(second.state.params["model"]), jax.device_get(second.state.rest["model"])
    np.testing.assert_array_equal(params["convs"][1]["kernel"][...], trained["convs"][1]["kernel"][...])
    np.testing.assert_array_equal(params["norms"][0]["scale"][...], trained["norms"][0]["scale"][...])
    np.testing.assert_array_equal(rest["norms"][1]["mean"][...], stats["norms"][1]["mean"][...])
    assert params["head"]["kernel"].shape == (16, 4)
    report = second.pretrained
    assert report.loaded == 10 and "another number of classes" in report.head_skipped
    assert "checkpoint step 20 in" in report.path and "(model 'simple_cnn')" in report.path

    # a checkpoint of another architecture: the first missing tensor is named, with its shape and the checkpoint
    expected = (r"checkpoint step 20 in .*pretrain.*: tensor 'convs\.2\.kernel' \(expected shape \(3, 3, 16, 32\), "
                r"for model 'simple_cnn''s convs\.2\.kernel\) is missing")
    with pytest.raises(WeightsError, match=expected):
        Trainer(compose([*FAST, "model.widths=[8,16,32]", f"model.pretrained={tmp_path / 'pretrain'}"]),
                tmp_path / "wrong")


def test_byol_target_starts_as_the_pretrained_network(tmp_path, train_run):
    """The momentum target copies the online network after ``model.pretrained`` replaced its weights."""
    from prism.framework.config import compose
    from prism.framework.train import Trainer

    first, _ = train_run(["model.widths=[8,16]"], run_dir=tmp_path / "pretrain")
    loaded = jax.tree.leaves(jax.device_get(first.state.params["model"]))
    byol = Trainer(compose([*FAST, "model.widths=[8,16]", "objective=byol", "augment=byol",
                            "objective.proj_hidden_dim=16", "objective.proj_output_dim=8",
                            "objective.pred_hidden_dim=16", f"model.pretrained={tmp_path / 'pretrain'}"]),
                   tmp_path / "byol")
    online = jax.tree.leaves(jax.device_get(byol.state.params["model"]))
    target = [np.asarray(w) for w in jax.tree.leaves(jax.device_get(byol.state.rest["objective"]["target_backbone"]))]
    assert len(target) == len(online) == len(loaded)
    for t, o, pre in zip(target, online, loaded, strict=True):
        np.testing.assert_array_equal(o, pre)
        np.testing.assert_array_equal(t, o)  # before the fix: the random weights it was built from


# -- logits parity with torchvision / timm --------------------------------------------------------------
PARITY = {  # name -> (input side, our config overrides, file format)
    "resnet50": (64, {}, "pth"),
    "vgg16_bn": (112, {"hidden": 64}, "pth"),  # 112 px: a 3x3 map pooled to 7x7, so the flatten order matters
    "alexnet": (224, {"hidden": 64}, "safetensors"),
    "densenet121": (64, {}, "safetensors"),
    "mobilenet_v2": (64, {}, "pth"),
    "vit_b16": (224, {}, "safetensors"),  # timm vit_base_patch16_224 at its own resolution
}


def _torch_model(name: str, classes: int):
    torch = pytest.importorskip("torch", reason="logits parity needs PyTorch: pip install -e '.[test,torch]'")
    tv = pytest.importorskip("torchvision", reason="logits parity needs torchvision: pip install -e '.[test,torch]'")
    torch.manual_seed(0)
    if name == "vit_b16":
        timm = pytest.importorskip("timm", reason="ViT parity needs timm: pip install -e '.[test,torch]'")
        return timm.create_model("vit_base_patch16_224", num_classes=classes, pretrained=False)
    model = getattr(tv.models, name)(num_classes=classes)
    if name in ("vgg16_bn", "alexnet"):  # narrow hidden FC layers (our `hidden`), torchvision's names kept
        first = 0 if name == "vgg16_bn" else 1
        model.classifier[first] = torch.nn.Linear(model.classifier[first].in_features, 64)
        model.classifier[first + 3] = torch.nn.Linear(64, 64)
        model.classifier[6] = torch.nn.Linear(64, classes)
    return model


def _randomize_norms(model, side: int) -> None:
    """Random BN/LayerNorm affine parameters, and BN running statistics of one random batch (what training
    leaves): the import must carry every tensor of every norm layer for the logits to agree."""
    import torch

    g = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
        for m in norms:
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)
            m.momentum = 1.0  # the running statistics become the batch's
        if norms:
            model.train()
            model(torch.randn(8, 3, side, side, generator=g))
    model.eval()


@pytest.mark.parametrize("name", list(PARITY))
def test_logits_match_pytorch_after_import(name, tmp_path):
    side, overrides, fmt = PARITY[name]
    torch_model = _torch_model(name, classes=10)
    import torch

    _randomize_norms(torch_model, side)
    state = {k: v.detach().contiguous() for k, v in torch_model.state_dict().items()}
    if name == "densenet121":  # the names of torchvision's published densenet files ("norm.1"), renamed on load
        state = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}
        assert "features.denseblock1.denselayer1.norm.1.weight" in state
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file as save_torch

        save_torch(state, str(path))
    model = _abstract(name, DataInfo(10, (side, side, 3)), **overrides)
    assert count_params(model) == sum(p.numel() for p in torch_model.parameters())

    report = load_pretrained(model, name, path)
    assert not report.head_skipped
    model.eval()
    graphdef, state = _concrete(model)  # the imported weights; fixed keys for the (unused) RNG streams
    x = np.random.default_rng(2).normal(size=(2, side, side, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    print(f"{name}: max |logit| {np.abs(theirs).max():.3g}, max |difference| {np.abs(ours - theirs).max():.3g}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pth_files_are_read_without_unpickling_code(tmp_path, capfd):
    torch = pytest.importorskip("torch", reason="reading .pth files needs PyTorch: pip install -e '.[test,torch]'")
    sd = {k: torch.from_numpy(v) for k, v in _resnet_state_dict(classes=10).items()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "ckpt.pth")
    model = _abstract("resnet18", DataInfo(10, (32, 32, 3)), **TINY_RESNET)
    assert load_pretrained(model, "resnet18", tmp_path / "ckpt.pth").loaded == 102  # timm/DDP wrapping removed

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match=r"weights_only=True"):
        load_pretrained(model, "resnet18", tmp_path / "evil.pth")
    assert "pickled code ran" not in capfd.readouterr().out
