"""The end-to-end GPU job's helpers on CPU: ``benchmarks/cifar10_prepare.py`` (airbench's tensors from JPEG
folders, checked against PIL), ``benchmarks/e2e_summary.py`` (summary.json from synthetic stage outputs, a
missing stage, a failed run, merging two calls), the PyTorch ResNet-18 script's smoke mode (when torch is
installed) and the shell script's syntax."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def jpeg_folder(tmp_path: Path) -> Path:
    """train/{cat,dog}/ (3 + 3 JPEGs) and test/{cat,dog}/ (2 + 2), 8x8 random pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "jpegs"
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i:04d}.jpg", quality=90)
    return root


def _pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _prepare(src: Path, out: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, str(BENCH / "cifar10_prepare.py"), str(src), str(out), "--workers", "0",
                    "--report", str(out / "report.json"), *extra], check=True, capture_output=True, text=True,
                   timeout=120)
    return json.loads((out / "report.json").read_text())


def test_prepare_npz_matches_pil(jpeg_folder: Path, tmp_path: Path):
    report = _prepare(jpeg_folder, tmp_path / "cifar10", "--format", "npz")
    assert report["classes"] == ["cat", "dog"] and report["train"]["count"] == 6 and report["test"]["count"] == 4
    for split, count in (("train", 3), ("test", 2)):
        data = np.load(tmp_path / "cifar10" / f"{split}.npz")
        images, labels = data["images"], data["labels"]
        assert images.shape == (2 * count, 8, 8, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and list(data["classes"]) == ["cat", "dog"]
        files = {(c, i): _pil(jpeg_folder / split / name / f"{i:04d}.jpg")
                 for c, name in enumerate(("cat", "dog")) for i in range(count)}
        if split == "test":  # folder order: class, then file name
            expected = [files[(c, i)] for c in range(2) for i in range(count)]
            np.testing.assert_array_equal(images, np.stack(expected))
            assert labels.tolist() == [0] * count + [1] * count
        else:  # shuffled: every file exactly once, with its folder's label
            matched = [next(key for key, px in files.items() if np.array_equal(px, im)) for im in images]
            assert sorted(matched) == sorted(files)
            assert [c for c, _ in matched] == labels.tolist()


def test_prepare_keeps_folder_order_with_seed_minus_one(jpeg_folder: Path, tmp_path: Path):
    _prepare(jpeg_folder, tmp_path / "c", "--format", "npz", "--seed", "-1")
    data = np.load(tmp_path / "c" / "train.npz")
    assert data["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data["images"][4], _pil(jpeg_folder / "train" / "dog" / "0001.jpg"))


def test_cifar10_class_order_is_torchvisions(tmp_path: Path):
    prepare = _module("cifar10_prepare")
    for name in reversed(prepare.CIFAR10_CLASSES):
        (tmp_path / name).mkdir()
    assert prepare.class_names(tmp_path) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                             "horse", "ship", "truck"]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed in this environment (the .pt format needs it)")
def test_prepare_pt_is_airbench_format(jpeg_folder: Path, tmp_path: Path):
    import torch

    _prepare(jpeg_folder, tmp_path / "cifar10")
    data = torch.load(tmp_path / "cifar10" / "test.pt")  # airbench: torch.load(path, map_location=gpu)
    assert set(data) == {"images", "labels", "classes"} and data["classes"] == ["cat", "dog"]
    assert data["images"].dtype == torch.uint8 and tuple(data["images"].shape) == (4, 8, 8, 3)
    assert data["labels"].dtype == torch.int64 and data["labels"].tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(data["images"][2].numpy(), _pil(jpeg_folder / "test" / "dog" / "0000.jpg"))


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _prism_result(acc: float, train_s: float, **extra) -> dict:
    return {"status": "completed", "metrics": {"eval/accuracy": acc},
            "timing": {"startup_s": 3.0, "prepare_s": 1.0, "compile_s": 9.0, "train_s": train_s, "eval_s": 0.5,
                       "checkpoint_s": 0.0},
            "process_s": 20.0, "time_to": {"0.9": {"from_start_s": 15.0, "from_first_step_s": 2.5, "step": 300},
                                           "0.94": None}, **extra}


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A work folder as e2e_gpu.sh leaves it, without the torch stage, with one failed prism94 seed."""
    w = tmp_path / "work"
    ok = {"rc": 0, "limit_s": 150, "timed_out": False}
    _write(w / "env" / "gpu.txt", "NVIDIA H200, 580.1, 143771 MiB\n")
    _write(w / "prepare" / "extract.json", {"extract_s": 4.2, "rc": 0, "train_images": 50000, "test_images": 10000})
    _write(w / "prepare" / "pt_report.json", {"total_s": 7.5})
    _write(w / "airbench" / "runs.jsonl", "\n".join(json.dumps(r) for r in [
        {"run": "warmup", "call_s": 9.0}, {"run": 0, "acc": 0.906, "val_acc": 0.9, "train_s": 2.1, "call_s": 3.0},
        {"run": 1, "acc": 0.908, "val_acc": 0.9, "train_s": 1.9, "call_s": 2.9}]) + "\n")
    _write(w / "airbench" / "process.json", {"process_s": 30.0, **ok})
    _write(w / "prism94" / "seed0" / "result.json", _prism_result(0.905, 3.0))
    _write(w / "prism94" / "seed0" / "process.json", {"process_s": 40.0, **ok})
    _write(w / "prism94" / "seed1" / "result.json", _prism_result(0.909, 2.0))
    _write(w / "prism94" / "seed1" / "process.json", {"process_s": 20.0, **ok})
    _write(w / "prism94" / "seed2" / "result.json", {"status": "failed", "error": "DataError: boom"})
    _write(w / "prism94" / "seed2" / "process.json", {"process_s": 5.0, **ok, "rc": 1})
    _write(w / "resnet18" / "prism" / "result.json", _prism_result(0.93, 8.0, loop_images_per_s=72000.0))
    _write(w / "resnet18" / "prism" / "process.json", {"process_s": 50.0, **ok})
    _write(w / "synthetic" / "bench.json", {"img_s": 80000.0, "step_ms_median": 6.4})
    _write(w / "synthetic" / "process.json", {"process_s": 35.0, **ok})
    _write(w / "notes.txt", "torch skipped: E2E_DEADLINE_S=550 reached\n")
    return w


def _summary(*srcs: Path, out: Path) -> tuple[dict, str]:
    subprocess.run([sys.executable, str(BENCH / "e2e_summary.py"), *map(str, srcs), "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=60)
    return json.loads((out / "summary.json").read_text()), (out / "summary.md").read_text()


def test_summary_from_stage_outputs_with_a_missing_stage(work: Path, tmp_path: Path):
    summary, md = _summary(work, out=tmp_path / "out")
    assert set(summary) == {"gpu", "airbench", "prism_airbench94", "resnet18", "errors"}
    assert summary["gpu"] == "NVIDIA H200"
    ab = summary["airbench"]
    assert set(ab) == {"acc_mean", "acc_std", "train_s_mean", "runs"} and len(ab["runs"]) == 2
    assert ab["acc_mean"] == pytest.approx(0.907) and ab["train_s_mean"] == pytest.approx(2.0)
    assert ab["acc_std"] == pytest.approx(np.std([0.906, 0.908], ddof=1))
    p94 = summary["prism_airbench94"]
    assert set(p94) == {"acc_mean", "acc_std", "train_s_mean", "process_s_mean", "runs"}
    assert p94["acc_mean"] == pytest.approx(0.907) and p94["train_s_mean"] == pytest.approx(2.5)
    assert p94["process_s_mean"] == pytest.approx(30.0)  # completed runs only
    assert [r["seed"] for r in p94["runs"]] == [0, 1, 2] and p94["runs"][2]["status"] == "failed"
    assert p94["runs"][0]["time_to"]["0.9"]["from_first_step_s"] == 2.5
    rn = summary["resnet18"]
    assert rn["prism"] == {"acc": 0.93, "train_s": 8.0, "process_s": 50.0, "loop_img_s": 72000.0}
    assert rn["torch"] is None and rn["prism_synthetic_step_img_s"] == 80000.0
    errors = " | ".join(summary["errors"])
    assert "torch: stage not run" in errors and "prism94 seed2" in errors and "DataError: boom" in errors
    assert "+0.00 pp" in md and "1.25x" in md and "0.900" in md  # acc diff, train ratio, loop / synthetic
    assert "torch skipped" in md
    stages = json.loads((tmp_path / "out" / "stages.json").read_text())
    assert stages["prepare"]["extract"]["extract_s"] == 4.2


def test_summary_merges_calls_and_tolerates_an_empty_folder(work: Path, tmp_path: Path):
    first = tmp_path / "call1"
    _summary(work, out=first)
    second = tmp_path / "work2"
    _write(second / "torch" / "result.json", {"acc": 0.935, "train_s": 10.0, "compile": False, "steps": 977})
    _write(second / "torch" / "process.json", {"process_s": 40.0, "rc": 0, "limit_s": 180, "timed_out": False})
    summary, md = _summary(first, second, out=tmp_path / "merged")
    assert summary["resnet18"]["torch"] == {"acc": 0.935, "train_s": 10.0}
    assert summary["airbench"]["acc_mean"] == pytest.approx(0.907)  # kept from the first call
    assert not any(e.startswith("torch") for e in summary["errors"])
    assert "0.80x" in md  # prism 8.0 s / torch 10.0 s

    empty, _ = _summary(tmp_path / "nothing", out=tmp_path / "empty")
    assert empty["gpu"] is None and empty["airbench"] is None and empty["resnet18"] is None
    assert len(empty["errors"]) >= 5


def test_e2e_shell_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    subprocess.run([bash, "-n", str(BENCH / "e2e_gpu.sh")], check=True, timeout=30)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed in this environment (.venv has no torch; "
                                          "the script runs on the GPU machine's torch)")
def test_torch_resnet18_smoke(jpeg_folder: Path, tmp_path: Path):
    out = tmp_path / "torch.json"
    subprocess.run([sys.executable, str(BENCH / "e2e_torch_resnet18.py"), str(jpeg_folder), "--epochs", "0.05",
                    "--limit", "512", "--batch", "4", "--workers", "0", "--warmup", "1", "--device", "cpu",
                    "--out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["steps"] == 1 and result["train_images"] == 6 and result["test_images"] == 4
    assert 0.0 <= result["acc"] <= 1.0 and result["train_s"] > 0
