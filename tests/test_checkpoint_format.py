"""The checkpoint format: the train state as a nested dict that orbax's tree metadata describes (format 2),
partial reads of the model for ``model.pretrained``, and checkpoints of the earlier flat format (version 1,
``tests/fixtures/checkpoint_v1``) restoring bit for bit and serving as pretrained weights."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prism.framework.api import DataInfo
from prism.framework.checkpoint import (
    CHECKSUMS_FILE,
    FORMAT,
    Checkpointer,
    signature,
    state_leaves,
)
from prism.framework.config import CheckpointConfig, compose
from prism.framework.errors import CheckpointError, NonFiniteLossError
from prism.framework.pretrained import WeightsError, load_pretrained
from prism.framework.registry import MODELS
from prism.framework.steps import STATE_DEFAULTS

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v1"
#: The overrides that wrote the fixture (see its README).
FIXTURE_RUN = ["train.steps=2", "train.batch_size=32", "train.eval_every=1", "logging.progress=false",
               "model.widths=[4,8]", "train.ema_decay=0.5", "train.max_eval_batches=1", "logging.tensorboard=false",
               "logging.plots=false", "logging.render=0", "checkpoint.enabled=false"]
DIGITS = DataInfo(10, (8, 8, 1))


class State(NamedTuple):
    """A train state in miniature: the leaf kinds of prism's TrainState."""

    step: jax.Array
    params: Any  # nnx.State
    rest: Any  # nnx.State, with an RNG key
    opt_state: Any
    ema_params: Any
    bad_step: jax.Array


def _model(widths=(4, 8), seed: int = 0, classes: int = 10) -> nnx.Module:
    cfg = dataclasses.replace(MODELS.get("simple_cnn").default_config(), widths=list(widths), num_classes=classes)
    return MODELS.build("simple_cnn", cfg, data=DIGITS, rngs=nnx.Rngs(seed))


def _state(seed: int = 0, ema: bool = True, **model_kw) -> State:
    class System(nnx.Module):
        def __init__(self):
            self.model = _model(seed=seed, **model_kw)

    _, params, rest = nnx.split(System(), nnx.Param, ...)
    params = jax.tree.map(lambda x: x + seed, params)
    ema_params = jax.tree.map(lambda x: x * 0.5, params) if ema else None
    return State(jnp.int32(seed), params, rest, optax.adam(1e-3).init(params), ema_params, jnp.int32(-1))


def _abstract(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _flat(tree) -> dict[str, np.ndarray]:
    return {name: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for _, name, x in state_leaves(jax.device_get(tree))}


def _assert_equal(a, b) -> None:
    flat_a, flat_b = _flat(a), _flat(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert flat_a[name].dtype == flat_b[name].dtype, name
        np.testing.assert_array_equal(flat_a[name], flat_b[name], err_msg=name)


CFG = CheckpointConfig(keep=5)


def test_state_round_trips_through_orbax_tree_metadata(tmp_path):
    state = _state(seed=1)
    checkpointer = Checkpointer(tmp_path / "checkpoints", CFG)
    checkpointer.save(7, state, data_state={"position": 3}, meta={"model": "simple_cnn"})
    checkpointer.close()

    reader = Checkpointer(tmp_path / "checkpoints", CFG, read_only=True)
    try:
        assert reader.format_version(7) == FORMAT
        shapes = reader.tree_shapes(7)  # orbax's own metadata, one plain string per level
        assert shapes[("params", "model", "convs", "1", "kernel")] == ((3, 3, 4, 8), np.dtype("float32"))
        assert shapes[("rest", "model", "norms", "0", "mean")][0] == (4,)
        assert shapes[("rest", "model", "dropout", "rngs", "key")][0] == (2,)  # PRNG key: its key data
        assert ("opt_state", "0", "mu", "model", "head", "bias") in shapes
        assert ("step",) in shapes and ("ema_params", "model", "head", "kernel") in shapes
        restored, data_state, meta = reader.restore(7, _abstract(state))
        assert reader.notes == []  # checksums present and verified
    finally:
        reader.close()
    _assert_equal(restored, state)
    key = restored.rest["model"]["dropout"]["rngs"]["key"].get_value()
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert data_state == {"position": 3} and meta == {"model": "simple_cnn"}
    assert (tmp_path / "checkpoints" / "7" / CHECKSUMS_FILE).is_file()

    # a state without an EMA (a None field) round-trips too
    plain = _state(seed=2, ema=False)
    checkpointer = Checkpointer(tmp_path / "plain", CheckpointConfig(async_save=False))
    checkpointer.save(1, plain)
    restored, _, _ = checkpointer.restore(1, _abstract(plain))
    checkpointer.close()
    assert restored.ema_params is None
    _assert_equal(restored, plain)


def test_restore_keeps_the_target_shardings(tmp_path):
    mesh = jax.make_mesh((4,), ("data",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(8.0), sharded), "b": jax.device_put(jnp.ones(3), replicated)}
    checkpointer = Checkpointer(tmp_path / "checkpoints", CFG)
    checkpointer.save(1, state)
    restored, _, _ = checkpointer.restore(1, _abstract(state))
    checkpointer.close()
    assert restored["w"].sharding.is_equivalent_to(sharded, 1)
    assert restored["b"].sharding.is_equivalent_to(replicated, 1)
    np.testing.assert_array_equal(restored["w"], np.arange(8.0))


def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", CFG)
    checkpointer.save(1, _state(widths=(4, 8)), meta={"model": "simple_cnn"})
    with pytest.raises(CheckpointError) as info:
        checkpointer.restore(1, _abstract(_state(widths=(4, 16))), meta_check={"model": "simple_cnn"})
    checkpointer.close()
    message = str(info.value)
    assert "['model']['convs'][1]['kernel']" in message
    assert "(3, 3, 4, 8) in the checkpoint" in message and "expected (3, 3, 4, 16)" in message
    assert type(info.value) is CheckpointError  # not "corrupt": restore_latest must not skip it


def test_saving_a_non_finite_state_is_refused_naming_the_array(tmp_path):
    state = _state()
    bad = state._replace(params=jax.tree.map(lambda x: x, state.params))
    scale = bad.params["model"]["norms"][1]["scale"]
    scale.set_value(scale.get_value().at[2].set(jnp.nan))
    checkpointer = Checkpointer(tmp_path / "checkpoints", CFG)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*\.params\['model'\]\['norms'\]\[1\]\['scale'\]\.value "
                                                 r"holds NaN or inf"):
        checkpointer.save(3, bad)
    checkpointer.close()
    assert checkpointer.all_steps() == []


def test_signature_names_leaves_as_before():
    sig = signature(_abstract(_state()))
    assert sig[".params['model']['head']['kernel'].value"] == [[8, 10], "float32"]
    assert sig[".rest['model']['dropout']['rngs']['key'].value"] == [[2], "uint32"]
    assert sig[".opt_state[0].count"] == [[], "int32"]


def test_pretrained_reads_only_the_model_of_a_format_2_checkpoint(tmp_path):
    state = _state(seed=3)
    checkpointer = Checkpointer(tmp_path / "run" / "checkpoints", CFG)
    checkpointer.save(5, state, meta={"model": "simple_cnn"})
    checkpointer.close()

    model = _model(seed=9, classes=4)  # another number of classes: the head keeps its initialisation
    head = np.asarray(model.head.kernel[...])
    report = load_pretrained(model, "simple_cnn", tmp_path / "run")
    assert report.loaded == 10 and "another number of classes" in report.head_skipped
    assert "checkpoint step 5 in" in report.path
    ema = state.ema_params["model"]  # the run kept an EMA: its weights are the ones loaded
    np.testing.assert_array_equal(model.convs[1].kernel[...], ema["convs"][1]["kernel"][...])
    np.testing.assert_array_equal(model.norms[0].scale[...], ema["norms"][0]["scale"][...])
    np.testing.assert_array_equal(model.norms[1].var[...], state.rest["model"]["norms"][1]["var"][...])
    np.testing.assert_array_equal(model.head.kernel[...], head)


# -- format 1 -------------------------------------------------------------------------------------------------
@pytest.fixture
def v1_run(tmp_path) -> Path:
    run_dir = tmp_path / "v1"
    shutil.copytree(FIXTURE / "checkpoints", run_dir / "checkpoints")
    return run_dir


def _fixture_trainer(tmp_path):
    from prism.framework.train import Trainer

    return Trainer(compose(FIXTURE_RUN), tmp_path / "reader", initialize=False)


def test_a_format_1_checkpoint_restores_bit_for_bit(v1_run, tmp_path):
    expected = dict(np.load(FIXTURE / "expected_state.npz"))
    trainer = _fixture_trainer(tmp_path)
    checkpointer = Checkpointer(v1_run / "checkpoints", CheckpointConfig())
    try:
        assert checkpointer.format_version(2) == 1
        with pytest.raises(CheckpointError, match=r"tensor \.bad_steps .* is missing from the checkpoint"):
            checkpointer.restore(2, trainer.abstract_state)  # a leaf added since: refused unless given a default
        state, data_state, meta = checkpointer.restore(2, trainer.abstract_state, meta_check={"model": "simple_cnn"},
                                                       defaults=STATE_DEFAULTS)
        assert len(checkpointer.notes) == 1 and "no prism_checksums.json" in checkpointer.notes[0]
        found = checkpointer.restore_latest(trainer.abstract_state, defaults=STATE_DEFAULTS)
    finally:
        checkpointer.close()
    assert int(state.bad_steps) == 0  # the counter the fixture predates starts at "nothing skipped"
    restored = _flat(state)
    restored.pop(".bad_steps")
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        assert restored[name].dtype == value.dtype, name
        np.testing.assert_array_equal(restored[name], value, err_msg=name)
    for leaf, ref in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.abstract_state), strict=True):
        assert leaf.sharding.is_equivalent_to(ref.sharding, leaf.ndim)
    assert data_state and meta["model"] == "simple_cnn"
    assert found is not None and found[0] == 2
    _assert_equal(found[1], state)


def test_a_format_1_checkpoint_serves_as_pretrained_weights(v1_run):
    expected = dict(np.load(FIXTURE / "expected_state.npz"))
    model = _model(seed=5)
    report = load_pretrained(model, "simple_cnn", v1_run)
    assert report.loaded == 12 and not report.head_skipped  # 8 parameters (from the EMA) + 4 BatchNorm statistics
    np.testing.assert_array_equal(model.convs[0].kernel[...],
                                  expected[".ema_params['model']['convs'][0]['kernel'].value"])
    np.testing.assert_array_equal(model.head.bias[...], expected[".ema_params['model']['head']['bias'].value"])
    np.testing.assert_array_equal(model.norms[1].mean[...], expected[".rest['model']['norms'][1]['mean'].value"])

    # another architecture: the first tensor this model needs and the checkpoint lacks is named
    with pytest.raises(WeightsError, match=r"tensor 'convs\.2\.kernel' \(expected shape \(3, 3, 8, 16\)"):
        load_pretrained(_model(widths=(4, 8, 16)), "simple_cnn", v1_run / "checkpoints" / "2")
