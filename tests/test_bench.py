"""``prism bench data``: times the real digits pipeline (host, then host + jitted augmentation)."""

from __future__ import annotations

import json

import pytest

from prism.framework.cli import main


def test_bench_data_on_digits_writes_positive_throughputs(tmp_path, capsys):
    out = tmp_path / "result" / "bench.json"
    # digits is prepared in the default data dir ($PRISM_DATA_DIR), shared with the training tests.
    code = main(["bench", "data", "--batches", "3", "--warmup", "1", "--out", str(out), "train.batch_size=32",
                 "augment.ops=[{name:random_resized_crop,size:[8,8]},{name:hflip,alternate:true}]"])
    assert code == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("data: digits batch=32 host ") and " img/s, host+augment " in line
    result = json.loads(out.read_text())
    for key in ("host_img_s", "host_augment_img_s", "host_s", "host_augment_s"):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["dataset"] == "digits" and result["batch_size"] == 32 and result["batches"] == 3
    assert result["split_size"] == 1437 and result["image_shape"] == [8, 8, 1] and result["augment_ops"] == 2
    assert result["overrides"][0] == "train.batch_size=32"


def test_bench_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "model"])
    assert exit_info.value.code == 2 and "invalid choice: 'model'" in capsys.readouterr().err
    assert main(["bench", "data", "dataset=digitz"]) == 2
    assert "unknown dataset 'digitz'" in capsys.readouterr().err
    assert main(["bench", "data", "--out", str(tmp_path / "x.json"), "train.no_such_key=1"]) == 1
    assert "no_such_key" in capsys.readouterr().err


def test_bench_train_times_the_trainer_step(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = main(["bench", "train", "--steps", "2", "--warmup", "1", "--out", str(out), "dataset=synthetic",
                 "dataset.image_size=8", "dataset.num_classes=10", "dataset.train_size=64", "model.widths=[4]",
                 "train.batch_size=8"])
    assert code == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("train: simple_cnn/supervised batch=8 fp32 synthetic on 4x cpu: ")
    r = json.loads(out.read_text())
    assert r["img_s"] > 0 and r["step_ms_median"] > 0 and r["compile_s"] > 0 and r["steps"] == 2
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # CPU: no known peak
    # simple_cnn widths [4] on 8x8x3: conv 3x3 3->4 (same padding), global pool, linear 4->10. The step
    # computes the conv forward and its weight gradient (not the input's), and the linear 3 times.
    conv = 2 * 8 * 8 * 8 * 4 * 3 * 9
    linear = 2 * 8 * 4 * 10
    assert r["model_tflops_per_step"] * 1e12 == pytest.approx(2 * conv + 3 * linear)


def test_flops_of_convolutions_and_matmuls_match_the_formulas():
    import jax
    import jax.numpy as jnp

    from prism.framework.flops import function_flops

    def conv(x, w, groups=1, stride=1):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", feature_group_count=groups,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jnp.ones((2, 16, 16, 8))
    assert function_flops(conv, x, jnp.ones((3, 3, 8, 4))) == 2 * 2 * 16 * 16 * 4 * 8 * 9
    assert function_flops(lambda x, w: conv(x, w, groups=4), x, jnp.ones((3, 3, 2, 8))) == 2 * 2 * 16 * 16 * 8 * 2 * 9
    assert function_flops(lambda x, w: conv(x, w, stride=2), x, jnp.ones((1, 1, 8, 4))) == 2 * 2 * 8 * 8 * 4 * 8
    assert function_flops(jnp.matmul, jnp.ones((3, 5, 7)), jnp.ones((7, 4))) == 2 * 3 * 5 * 4 * 7
    # the forward matmul plus, for the gradient w.r.t. both operands, two more of the same size
    both = jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1))
    assert function_flops(both, jnp.ones((5, 7)), jnp.ones((7, 4))) == 3 * (2 * 5 * 4 * 7)
