"""Checkpoint integrity: checksums written once a save is complete, verified on restore; ``restore_latest``
falls back past corrupt, unreadable or non-finite steps, saying so, and refuses when none is usable.

Real orbax on real files, tiny pytrees: no model is trained here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism.framework import checkpoint as checkpoint_module
from prism.framework.checkpoint import CHECKSUMS_FILE, Checkpointer, CorruptCheckpointError
from prism.framework.config import CheckpointConfig
from prism.framework.errors import CheckpointError


def _state(step: int) -> dict:
    key = jax.random.key(step)
    return {"step": jnp.int32(step), "params": {"w": jnp.full((64, 16), float(step)), "b": jnp.arange(16.0) + step},
            "rng": key, "count": jnp.uint32(step)}


def _abstract(state: dict) -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


ABSTRACT = _abstract(_state(0))


def _write(directory: Path, steps=(1, 2, 3), **cfg) -> Path:
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10, **cfg))
    for step in steps:
        checkpointer.save(step, _state(step), data_state={"position": step}, meta={"model": "tiny"})
    checkpointer.close()
    return directory


def _flip(path: Path, count: int = 100) -> None:
    data = bytearray(path.read_bytes())
    for i in np.linspace(0, len(data) - 1, num=min(count, len(data)), dtype=int):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE),
               key=lambda p: p.stat().st_size)


def _assert_is(state, step: int) -> None:
    expected = _state(step)
    np.testing.assert_array_equal(state["params"]["w"], expected["params"]["w"])
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(expected["rng"]))
    assert int(state["step"]) == step


@pytest.mark.parametrize("async_save", [True, False])
def test_every_complete_step_gets_checksums(tmp_path, async_save):
    directory = _write(tmp_path / "checkpoints", async_save=async_save)
    for step in (1, 2, 3):
        listing = json.loads((directory / str(step) / CHECKSUMS_FILE).read_text())
        assert listing["algorithm"] == "sha256"
        files = {p.relative_to(directory / str(step)).as_posix() for p in (directory / str(step)).rglob("*")
                 if p.is_file() and p.name != CHECKSUMS_FILE}
        assert set(listing["files"]) == files and any(f.startswith("state/") for f in files)


def test_flipped_bytes_in_the_latest_step_fall_back_to_the_previous(tmp_path, caplog):
    directory = _write(tmp_path / "checkpoints")
    victim = _largest_file(directory / "3")
    _flip(victim)
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10))
    with caplog.at_level(logging.WARNING, logger="prism.checkpoint"):
        step, state, data_state, meta = checkpointer.restore_latest(ABSTRACT)
    assert step == 2 and data_state == {"position": 2} and meta == {"model": "tiny"}
    _assert_is(state, 2)
    rel = victim.relative_to(directory / "3").as_posix()
    skipped, restored = checkpointer.notes
    assert "step 3" in skipped and f"checksum mismatch in {rel}" in skipped
    assert "restored step 2" in restored and "skipped step 3" in restored and "3.corrupt" in restored
    assert skipped in caplog.text and restored in caplog.text
    # the unusable step is moved aside, so the resumed run can save step 3 again
    assert checkpointer.latest_step() == 2 and (directory / "3.corrupt").is_dir()
    checkpointer.save(3, _state(3))
    checkpointer.close()
    assert Checkpointer(directory, CheckpointConfig(), read_only=True).restore_latest(ABSTRACT)[0] == 3


def test_restore_of_a_chosen_step_verifies_it(tmp_path):
    """``prism eval`` restores a chosen step through ``Checkpointer.restore``: read-only, nothing moved."""
    directory = _write(tmp_path / "checkpoints", steps=(1, 2))
    _flip(_largest_file(directory / "2"))
    reader = Checkpointer(directory, CheckpointConfig(), read_only=True)
    with pytest.raises(CorruptCheckpointError, match=r"step 2 .* is corrupt: checksum mismatch in "):
        reader.restore(2, ABSTRACT)
    state, _, _ = reader.restore(1, ABSTRACT)
    _assert_is(state, 1)
    step, _, _, _ = reader.restore_latest(ABSTRACT)
    assert step == 1 and "skipped step 2" in reader.notes[-1] and "moved" not in reader.notes[-1]
    reader.close()
    assert (directory / "2").is_dir()


def test_all_corrupt_raises_a_one_line_checkpoint_error(tmp_path):
    directory = _write(tmp_path / "checkpoints")
    for step in (1, 2, 3):
        _flip(_largest_file(directory / str(step)))
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10))
    with pytest.raises(CheckpointError) as info:
        checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    message = str(info.value)
    assert "\n" not in message
    assert f"none of the 3 checkpoints in {directory} is usable" in message
    assert all(f"step {s}:" in message for s in (1, 2, 3))
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]  # nothing moved when nothing is usable


def test_a_step_holding_nan_is_skipped(tmp_path, monkeypatch):
    directory = _write(tmp_path / "checkpoints", steps=(1, 2))
    nan = _state(3)
    nan["params"]["b"] = nan["params"]["b"].at[5].set(jnp.nan)
    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10))
    with monkeypatch.context() as m:  # as an older prism, which saved whatever it had
        m.setattr(checkpoint_module, "first_nonfinite", lambda tree: None)
        checkpointer.save(3, nan)
    checkpointer.close()
    assert (directory / "3" / CHECKSUMS_FILE).is_file()  # intact on disk: only its values are bad

    checkpointer = Checkpointer(directory, CheckpointConfig(keep=10))
    step, state, _, _ = checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    assert step == 2
    _assert_is(state, 2)
    assert "step 3" in checkpointer.notes[0] and "NaN or inf values (array ['params']['b'])" in checkpointer.notes[0]


def test_checkpoints_without_checksums_still_load(tmp_path):
    directory = _write(tmp_path / "checkpoints", steps=(1, 2))
    for step in (1, 2):
        (directory / str(step) / CHECKSUMS_FILE).unlink()
    checkpointer = Checkpointer(directory, CheckpointConfig())
    step, state, _, _ = checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    assert step == 2
    _assert_is(state, 2)
    assert len(checkpointer.notes) == 1
    assert "step 2" in checkpointer.notes[0] and f"has no {CHECKSUMS_FILE}" in checkpointer.notes[0]
    assert "without verification" in checkpointer.notes[0]


def test_an_unreadable_step_without_checksums_falls_back(tmp_path):
    """Without checksums a damaged step is still caught when orbax cannot read it."""
    directory = _write(tmp_path / "checkpoints", steps=(1, 2))
    (directory / "2" / CHECKSUMS_FILE).unlink()
    (directory / "2" / "state" / "_METADATA").unlink()
    checkpointer = Checkpointer(directory, CheckpointConfig())
    step, state, _, _ = checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    assert step == 1
    _assert_is(state, 1)
    assert any("step 2" in n and "unreadable" in n for n in checkpointer.notes)


def test_no_checkpoint_gives_none(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", CheckpointConfig())
    assert checkpointer.restore_latest(ABSTRACT) is None
    checkpointer.close()
