"""Config validation (prism.framework.validate): every field of the root schema declares what it may be, a bad
value of each is one ConfigError naming the key, the value and the range; keys no schema has are refused
(``+train.epoch=3``); plugins declare ranges the same way; every dataset node has train_split/eval_split."""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field

import pytest
from conftest import read_result, run_prism
from omegaconf import OmegaConf, open_dict

from prism.framework.config import COMMON_FIELDS, PrismConfig, compose
from prism.framework.errors import ConfigError
from prism.framework.registry import DATASETS, MODELS, REGISTRIES
from prism.framework.validate import (
    CHECK_KEYS,
    check_added_keys,
    checks_of,
    describe,
    iter_schema_fields,
    validate_config,
)

#: Root-schema fields that take any value of their type: flags, a metric name, free-form lists and nodes
#: (checked where they are read), and the plugin groups (each plugin's dataclass declares its own ranges).
UNCHECKED = {
    "model", "dataset", "objective", "task", "optimizer", "schedule", "evals",
    "train.weight_decay_skip_1d", "augment.ops", "augment.views", "loader.shuffle",
    "checkpoint.enabled", "checkpoint.best_metric", "checkpoint.async_save", "checkpoint.resume",
    "checkpoint.resume_changed",
    "logging.progress", "logging.tensorboard", "logging.plots",
}

SCHEMA = list(iter_schema_fields(PrismConfig))
CHECKED = [(key, f, kind) for key, f, kind in SCHEMA if checks_of(f)]


@pytest.fixture(scope="module")
def default_cfg():
    return compose([])


def _is_int(kind) -> bool:
    return kind is int or typing.get_args(kind) == (int,)


def _bad_values(checks: dict, kind) -> list:
    """Values just outside what ``checks`` allow (of the field's type)."""
    step = 1 if _is_int(kind) else 0.5
    if "choices" in checks:
        return ["not_a_choice"] if str in (kind, *typing.get_args(kind)) else [max(checks["choices"]) + 1]
    bad = []
    if "ge" in checks:
        bad.append(checks["ge"] - step)
    if "gt" in checks:
        bad.append(checks["gt"])
    if "le" in checks:
        bad.append(checks["le"] + step)
    if "lt" in checks:
        bad.append(checks["lt"])
    if _is_int(kind):
        return bad
    return [float(b) for b in bad] + [math.inf, math.nan]


def test_every_field_of_the_root_schema_declares_its_range_or_is_known_free():
    unchecked = {key for key, f, _ in SCHEMA if not checks_of(f)}
    assert unchecked == UNCHECKED, "a new numeric or enumerated field needs metadata={'ge': ...} or 'choices'"
    for key, f, kind in SCHEMA:  # every number is bounded or at least finite
        if kind in (int, float):
            assert checks_of(f), key


@pytest.mark.parametrize(("key", "f", "kind"), CHECKED, ids=[key for key, _, _ in CHECKED])
def test_a_bad_value_of_each_field_is_a_config_error_naming_it(default_cfg, key, f, kind):
    checks = checks_of(f)
    is_list = typing.get_origin(kind) is list
    for bad in _bad_values(checks, typing.get_args(kind)[0] if is_list else kind):
        cfg = copy.deepcopy(default_cfg)
        if "when" in checks:  # make the condition hold (train.epochs is checked while train.steps is 0)
            sibling, value = checks["when"]
            OmegaConf.update(cfg, f"{key.rsplit('.', 1)[0]}.{sibling}", value)
        OmegaConf.update(cfg, key, [1.0, bad] if is_list else bad)
        with pytest.raises(ConfigError) as info:
            validate_config(cfg)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{key}[1] must be " if is_list else f"{key} must be "), message
        assert describe({k: v for k, v in checks.items() if k != "when"}) in message
        assert message.endswith(f"got {bad!r}"), message
    validate_config(default_cfg)  # the defaults pass


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["train.eval_batch_size=-1"], "train.eval_batch_size must be >= 0, got -1"),
        (["train.steps=0", "train.epochs=0"], "train.epochs must be > 0 when train.steps is 0, got 0.0"),
        (["train.ema_decay=1"], "train.ema_decay must be in [0, 1), got 1.0"),
        (["loader.device_memory_fraction=1.5"], "loader.device_memory_fraction must be in (0, 1], got 1.5"),
        (["checkpoint.best_mode=maximum"], "checkpoint.best_mode must be one of max, min, got 'maximum'"),
        (["precision=fp16"], "precision must be one of fp32, bf16, got 'fp16'"),
        (["train.time_to=[0.9,inf]"], "train.time_to[1] must be a finite number, got inf"),
        # plugins declare ranges the same way (plugins/datasets/digits.py, plugins/objectives/simclr.py)
        (["dataset.test_fraction=1.5"], "dataset.test_fraction must be in (0, 1), got 1.5"),
        (["dataset=synthetic", "dataset.channels=2"], "dataset.channels must be one of 1, 3, got 2"),
        (["model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),  # trained to chance before
        (["model=vit_ti16", "model.attention_dropout=-0.1"], "model.attention_dropout must be in [0, 1), got -0.1"),
    ],
)
def test_composed_bad_values(overrides, message):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    assert str(info.value) == message


def test_a_value_inside_its_range_passes():
    cfg = compose(["train.steps=5", "train.epochs=0", "train.ema_decay=0.999", "loader.device_memory_fraction=1",
                   "train.time_to=[0.5,0.9]", "checkpoint.best_mode=min", "precision=bf16"])
    assert cfg.train.epochs == 0  # epochs may be anything while steps decides


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+train.epoch=3", ["unknown config key 'train.epoch'", "Did you mean: train.epochs?"]),
        ("++train.epoch=3", ["unknown config key 'train.epoch'", "Did you mean: train.epochs?"]),
        ("+checkpoint.kep=3", ["'checkpoint.kep'", "Did you mean: checkpoint.keep?"]),
        ("+seeds=3", ["unknown config key 'seeds'", "Did you mean: seed?"]),
        ("+model.widht=3", ["'model.widht'", "SimpleCNNConfig", "Did you mean: model.widths?"]),
        ("+optimizer.learning_rate=0.1", ["'optimizer.learning_rate'", "AdamWConfig"]),
    ],
)
def test_adding_an_unknown_key_is_refused_with_suggestions(override, expected):
    with pytest.raises(ConfigError) as info:
        check_added_keys([override])
    message = str(info.value)
    assert message.startswith(f"override '{override}': ")
    for text in expected:
        assert text in message, message
    with pytest.raises(ConfigError, match="unknown config key"):  # compose refuses it too
        compose([override])


def test_added_keys_that_are_groups_or_free_form_are_left_to_hydra():
    check_added_keys(["+experiment=fashion_mnist_cnn", "+hydra/sweeper=optuna", "+hydra.job.env_set.X=1",
                      "+evals.knn.task=knn", "train.steps=3", "model=resnet18"])
    assert compose(["+evals.knn.task=knn"]).evals.knn.task == "knn"


def test_a_key_added_by_other_means_is_refused_after_composition():
    """An experiment file or a notebook can add keys too: the composed config is checked against its schemas."""
    cfg = compose([])
    with open_dict(cfg.train):
        cfg.train.epoch = 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*Did you mean: train.epochs\?"):
        validate_config(cfg)
    with open_dict(cfg.train):
        del cfg.train["epoch"]
    with open_dict(cfg.model):
        cfg.model.depht = 2
    with pytest.raises(ConfigError, match=r"unknown config key 'model.depht': model \(SimpleCNNConfig\) has no key"):
        validate_config(cfg)


@dataclass
class RangedConfig:
    """A third-party plugin's config with ranges in its metadata."""

    width: int = field(default=4, metadata={"ge": 1})
    mode: str = field(default="a", metadata={"choices": ("a", "b")})


@dataclass
class OwnSplitsConfig:
    eval_split: str = "validation"
    size: int = 3


@pytest.fixture
def test_plugins():
    MODELS.register("test_ranged_model", config=RangedConfig)(lambda cfg, **kw: None)
    DATASETS.register("test_own_splits", config=OwnSplitsConfig)(lambda cfg: None)
    DATASETS.register("test_no_config")(lambda: None)
    yield
    MODELS.unregister("test_ranged_model")
    DATASETS.unregister("test_own_splits")
    DATASETS.unregister("test_no_config")


def test_plugin_dataclass_ranges_are_checked(test_plugins):
    assert compose(["model=test_ranged_model", "model.width=2"]).model.width == 2
    with pytest.raises(ConfigError) as info:
        compose(["model=test_ranged_model", "model.width=0"])
    assert str(info.value) == "model.width must be >= 1, got 0"
    with pytest.raises(ConfigError, match="model.mode must be one of a, b, got 'c'"):
        compose(["model=test_ranged_model", "model.mode=c"])


def test_every_dataset_node_has_the_split_keys(test_plugins):
    assert [name for name, *_ in COMMON_FIELDS["dataset"]] == ["train_split", "eval_split", "one_class"]
    for name in DATASETS.names():
        cfg = compose([f"dataset={name}"], validate=False)
        assert isinstance(cfg.dataset.train_split, str) and isinstance(cfg.dataset.eval_split, str), name
    own = compose(["dataset=test_own_splits"]).dataset
    assert (own.train_split, own.eval_split, own.size) == ("train", "validation", 3)  # the plugin's default kept
    bare = compose(["dataset=test_no_config"]).dataset
    assert (bare.name, bare.train_split, bare.eval_split) == ("test_no_config", "train", "test")
    assert compose(["dataset=test_no_config", "dataset.train_split='train[:50%]'"]).dataset.train_split == "train[:50%]"


def test_every_builtin_plugin_default_passes_validation():
    from prism.framework.config import SELECTED_KINDS, group_options

    for kind in SELECTED_KINDS:
        for name in group_options(kind):
            compose([f"{kind}={name}"])


def test_declared_metadata_keys_are_known():
    """A misspelt metadata key ({'gte': 1}) would silently check nothing."""
    from prism.framework.validate import CHECK_KEYS

    for key, f, _ in SCHEMA:
        assert set(f.metadata) <= set(CHECK_KEYS), key


#: Numeric and list fields of the built-in plugins' configs that take any value of their type (``kind/name.field``).
PLUGIN_UNCHECKED = {
    "dataset/mask_folder.class_names",  # display names, any strings (the builder checks their count)
    "dataset/voc_folder.classes",  # VOC object names in label order, any strings
    "task/explain_faithfulness.method_settings",  # the explainer's settings, checked against its own config
}


def _plugin_fields(kind: str) -> list[tuple[str, type, dataclasses.Field, typing.Any]]:
    """``(plugin name, config class, field, resolved type)`` for every field of every ``kind`` plugin's config."""
    from prism.framework.plugins import load_plugins

    load_plugins()
    rows = []
    for name in REGISTRIES[kind].names():
        config = REGISTRIES[kind].get(name).config
        if config is None:
            continue
        types = typing.get_type_hints(config)
        rows.extend((name, config, f, types.get(f.name, f.type)) for f in dataclasses.fields(config))
    return rows


def _good_value(checks: dict, kind):
    """A value inside what ``checks`` allow (of the field's type)."""
    if "choices" in checks:
        return checks["choices"][0]
    step = 1 if _is_int(kind) else 0.5
    low = checks.get("ge", checks["gt"] + step if "gt" in checks else None)
    high = checks.get("le", checks["lt"] - step if "lt" in checks else None)
    if "gt" in checks and "lt" in checks and not _is_int(kind):
        return (checks["gt"] + checks["lt"]) / 2
    return low if low is not None else high if high is not None else 0


@pytest.mark.parametrize("kind", ["model", "dataset", "objective", "task", "optimizer", "schedule"])
def test_a_bad_value_of_each_plugin_field_is_a_config_error_naming_it(kind):
    """Every checked field of every registered ``kind`` plugin, in a config that selects the plugin: a value just
    outside its range is one ConfigError naming ``<kind>.<field>``, the allowed range and the value."""
    tested: dict[str, int] = {}
    base_of: dict[str, typing.Any] = {}
    for name, _, f, field_type in _plugin_fields(kind):
        checks = checks_of(f)
        if not checks:
            continue
        if name not in base_of:  # compose once per plugin; its defaults pass
            base_of[name] = compose([f"{kind}={name}"])
        key = f"{kind}.{f.name}"
        is_list = typing.get_origin(field_type) is list
        is_dict = typing.get_origin(field_type) is dict
        element = typing.get_args(field_type)[-1] if is_list or is_dict else field_type
        range_checks = {k: v for k, v in checks.items() if k != "when"}
        for bad in _bad_values(range_checks, element):
            cfg = copy.deepcopy(base_of[name])
            if "when" in checks:  # make the condition hold (warmup_fraction is read while warmup_steps is -1)
                sibling, value = checks["when"]
                OmegaConf.update(cfg, f"{kind}.{sibling}", value)
            value = [_good_value(range_checks, element), bad] if is_list else {"a*": bad} if is_dict else bad
            OmegaConf.update(cfg, key, value, merge=False)
            with pytest.raises(ConfigError) as info:
                validate_config(cfg)
            message = str(info.value)
            assert "\n" not in message, (name, message)
            where = f"{key}[1]" if is_list else f"{key}['a*']" if is_dict else key
            assert message.startswith(f"{where} must be "), (name, message)
            assert describe(range_checks) in message, (name, message)
            assert message.endswith(f"got {bad!r}"), (name, message)
            tested[name] = tested.get(name, 0) + 1
    assert tested, f"no {kind} plugin declares a range"
    assert set(tested) == set(base_of)


def test_every_numeric_or_list_field_of_a_builtin_plugin_declares_its_range_or_is_known_free():
    """A new number or list in a built-in plugin's config needs metadata={'ge': ...} (or a place in
    PLUGIN_UNCHECKED, with the reason); misspelt metadata keys ({'gte': 1}) would check nothing."""
    unchecked, numbers = set(), 0
    for kind in ("model", "dataset", "objective", "task", "optimizer", "schedule"):
        for name, config, f, field_type in _plugin_fields(kind):
            assert set(f.metadata) <= set(CHECK_KEYS), f"{kind}/{name}.{f.name}: {sorted(f.metadata)}"
            if not config.__module__.startswith("prism.plugins."):
                continue  # a third-party plugin decides for itself
            if field_type in (int, float) or typing.get_origin(field_type) in (list, tuple, dict):
                numbers += 1
                if not checks_of(f):
                    unchecked.add(f"{kind}/{name}.{f.name}")
    assert numbers > 100  # the enumeration reached the plugins' configs
    assert unchecked == PLUGIN_UNCHECKED, "give the new field metadata={'ge': ...}, or document it as free"


#: String fields of the built-in plugins that take free text, by field name: paths and file/folder names, name
#: patterns, TFDS builder and feature names, alphabets, and names another registry checks with close matches.
FREE_STRING_FIELDS = {
    "path", "data_dir", "pairs", "fonts", "images", "masks", "annotations", "train_list", "test_list", "labels",
    "test_labels", "mask_pattern", "builder", "image_key", "label_key", "alphabet", "method", "layer",
}


def test_every_enumerated_string_field_of_a_builtin_plugin_declares_its_choices():
    """A string that picks one of a few behaviours (a stem, a padding, a loss, 'fail'/'skip') declares
    metadata={'choices': ...}, so a typo is refused before anything runs with the allowed values named, not
    after the dataset was prepared; free text (paths, names) is listed in FREE_STRING_FIELDS."""
    from prism.framework.config import COMMON_FIELDS

    common = {name for fields in COMMON_FIELDS.values() for name, *_ in fields}
    enumerated, free = set(), set()
    for kind in ("model", "dataset", "objective", "task", "optimizer", "schedule"):
        for name, config, f, field_type in _plugin_fields(kind):
            if field_type is not str or f.name in common or not config.__module__.startswith("prism.plugins."):
                continue
            if "choices" in checks_of(f):
                enumerated.add(f"{kind}/{name}.{f.name}")
            elif f.name not in FREE_STRING_FIELDS:
                free.add(f"{kind}/{name}.{f.name}")
    assert not free, f"declare metadata={{'choices': ...}} for {sorted(free)} (or list free text in FREE_STRING_FIELDS)"
    assert {"model/resnet18.stem", "model/unet.padding", "objective/segmentation.loss"} <= enumerated


NO_OUTPUTS = ["checkpoint.enabled=false", "logging.tensorboard=false", "logging.plots=false",
              "logging.progress=false"]


def test_cli_refuses_an_added_unknown_key_before_a_run_starts(tmp_path):
    proc = run_prism("train", "+train.epoch=3", cwd=tmp_path)

    assert proc.returncode == 2
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("prism: error:")]
    assert "unknown config key 'train.epoch'" in error and "Did you mean: train.epochs?" in error
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_cli_bad_value_is_one_line_and_fails_the_run(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_prism("train", "train.batch_size=0", *NO_OUTPUTS, f"hydra.run.dir={run_dir}", cwd=tmp_path)

    assert proc.returncode == 2
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("prism: error:")]
    assert error == "prism: error: train.batch_size must be >= 1, got 0"
    assert "Traceback" not in proc.stderr
    result = read_result(run_dir)
    assert result["status"] == "failed"
    assert result["error"] == "ConfigError: train.batch_size must be >= 1, got 0"
