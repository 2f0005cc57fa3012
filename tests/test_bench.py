"""``prism bench data``: times the real digits pipeline (host, then host + jitted augmentation)."""

from __future__ import annotations

import json

import pytest

from framework.cli import main


def test_bench_data_on_digits_writes_positive_throughputs(tmp_path, capsys):
    out = tmp_path / "result" / "bench.json"
    # digits is prepared in the default data dir ($PRISM_DATA_DIR), shared with the training tests.
    code = main(["bench", "data", "--batches", "3", "--warmup", "1", "--out", str(out), "train.batch_size=32",
                 "augment=flip_crop", "augment.ops.0.size=[8,8]"])
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
