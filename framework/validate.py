"""Config validation before anything runs: value ranges declared next to the fields, and no unknown keys.

A config dataclass (the root schema in :mod:`prism.framework.config`, or a plugin's) declares what its values
may be in the field's metadata; plain data, so a plugin needs no import for it::

    batch_size: int = field(default=64, metadata={"ge": 1})
    ema_decay: float = field(default=0.0, metadata={"ge": 0, "lt": 1})
    best_mode: str = field(default="max", metadata={"choices": ("max", "min")})
    epochs: float = field(default=1.0, metadata={"gt": 0, "when": ("steps", 0)})
    time_to: list[float] = field(default_factory=list, metadata={"finite": True})

Keys: ``ge`` / ``gt`` / ``le`` / ``lt`` bound a number (which must then also be finite), ``finite`` asks only
that, ``choices`` lists the allowed values, ``when=(SIBLING, VALUE)`` applies the field's checks only while
the sibling field has that value. A list value is checked element by element, a dict value by value
(``lr_multipliers: dict[str, float] = field(..., metadata={"ge": 0})``).

:func:`validate_config` checks a composed config against every structured node in it (the root schema and
the chosen plugins' nodes) and raises one :class:`~prism.framework.errors.ConfigError` naming the key, the
bad value and what is allowed. It also refuses keys that no schema declares: Hydra's ``+key=value`` adds
keys to a structured config without complaint (``+train.epoch=3`` would be ignored silently);
:func:`check_added_keys` refuses those before composition, with close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from prism.framework.errors import ConfigError

#: The metadata keys :func:`validate_config` reads.
CHECK_KEYS = ("ge", "gt", "le", "lt", "finite", "choices", "when")
_BOUNDS = ("ge", "gt", "le", "lt")


def checks_of(f: dataclasses.Field) -> dict[str, Any]:
    """The validation metadata of one dataclass field (empty when it declares none)."""
    return {k: f.metadata[k] for k in CHECK_KEYS if k in f.metadata}


def describe(checks: dict[str, Any]) -> str:
    """What ``checks`` allow, in words: ``>= 1``, ``in [0, 1)``, ``one of max, min``, ``a finite number``."""
    if "choices" in checks:
        return "one of " + ", ".join(str(c) for c in checks["choices"])
    low = ("ge", checks["ge"]) if "ge" in checks else ("gt", checks["gt"]) if "gt" in checks else None
    high = ("le", checks["le"]) if "le" in checks else ("lt", checks["lt"]) if "lt" in checks else None
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    if low or high:
        op, bound = low or high
        return f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}[op]} {bound}"
    return "a finite number" if checks.get("finite") else "anything"


def _allowed(value: Any, checks: dict[str, Any]) -> bool:
    if "choices" in checks and value not in checks["choices"]:
        return False
    if any(k in checks for k in _BOUNDS) or checks.get("finite"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if ("ge" in checks and not value >= checks["ge"]) or ("gt" in checks and not value > checks["gt"]):
            return False
        if ("le" in checks and not value <= checks["le"]) or ("lt" in checks and not value < checks["lt"]):
            return False
    return True


def check_value(key: str, value: Any, checks: dict[str, Any], *, condition: str = "") -> None:
    """Raise a ConfigError unless ``value`` (a list: each element) passes ``checks``; ``key`` names it."""
    if not checks:
        return
    if isinstance(value, ListConfig | list | tuple):
        for i, item in enumerate(value):
            check_value(f"{key}[{i}]", item, checks, condition=condition)
        return
    if isinstance(value, DictConfig | dict):
        for name, item in value.items():
            check_value(f"{key}[{str(name)!r}]", item, checks, condition=condition)
        return
    if value is None or _allowed(value, checks):
        return
    raise ConfigError(f"{key} must be {describe(checks)}{condition}, got {value!r}")


def _dataclass_of(node: DictConfig) -> type | None:
    try:
        kind = OmegaConf.get_type(node)
    except Exception:  # pragma: no cover - a broken node is reported by Hydra/OmegaConf itself
        return None
    return kind if isinstance(kind, type) and dataclasses.is_dataclass(kind) else None


def _unknown_key(where: str, key: str, known: Sequence[str], schema: type | None) -> ConfigError:
    full = f"{where}.{key}" if where else key
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(f'{where}.{c}' if where else c for c in close)}?" if close else ""
    if schema is not None and schema.__name__.endswith("Node") and dataclasses.is_dataclass(schema.__mro__[1]):
        schema = schema.__mro__[1]  # config.config_node's subclass of a plugin's dataclass: name the plugin's
    owner = f"{where} ({schema.__name__})" if where and schema else (schema.__name__ if schema else where)
    return ConfigError(f"unknown config key {full!r}: {owner} has no key {key!r}, so nothing would read it.{hint} "
                       f"Keys of {where or 'the config'}: {', '.join(known)}.")


def _walk(node: DictConfig, where: str) -> None:
    schema = _dataclass_of(node)
    if schema is not None:
        fields = {f.name: f for f in dataclasses.fields(schema)}
        for key in node:
            if key not in fields:
                raise _unknown_key(where, str(key), list(fields), schema)
        for name, f in fields.items():
            checks = checks_of(f)
            if not checks or OmegaConf.is_missing(node, name):
                continue
            condition = ""
            if "when" in checks:
                sibling, expected = checks.pop("when")
                if node.get(sibling) != expected:
                    continue
                condition = f" when {where + '.' if where else ''}{sibling} is {expected}"
            check_value(f"{where}.{name}" if where else name, node[name], checks, condition=condition)
    for key in node:
        if OmegaConf.is_missing(node, key):
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            _walk(node[key], f"{where}.{key}" if where else str(key))


def validate_config(cfg: DictConfig) -> None:
    """Check a composed config: every value within its declared range, no key that its schema lacks.

    Walks every structured node (the root :class:`~prism.framework.config.PrismConfig` and its sections, the
    chosen plugins' config nodes); unstructured parts (``evals``, free-form dicts) are not checked here.
    Raises :class:`~prism.framework.errors.ConfigError` with one line naming the key, the value and the
    allowed range.
    """
    _walk(cfg, "")


def validate_node(node: DictConfig, where: str) -> None:
    """:func:`validate_config` for one structured node built apart (an evaluator's task), its keys named
    ``<where>.<key>``."""
    _walk(node, where)


# -- before composition: '+key=value' overrides --------------------------------------------------------------


def _field_types(schema: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(schema)
    except Exception:  # an annotation that does not resolve: take the fields' raw types
        return {f.name: f.type for f in dataclasses.fields(schema)}


def _plugin_schema(kind: str, overrides: Sequence[str]) -> type | None:
    """The config node of the ``kind`` plugin these overrides choose (or ``conf/config.yaml``'s default);
    None when that is not known before composition (a preset, an experiment, a sweep over several)."""
    from prism.framework.config import CONF_DIR, config_node
    from prism.framework.registry import REGISTRIES

    chosen = None
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == kind:
            chosen = value.strip()
        elif key.lstrip("+~") == "experiment":
            return None
    if chosen is None:
        try:
            defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml")).get("defaults", [])
        except Exception:
            return None
        chosen = next((d[kind] for d in defaults if isinstance(d, dict) and kind in d), None)
    if not chosen or "," in chosen or chosen not in REGISTRIES[kind]:
        return None
    return config_node(REGISTRIES[kind].get(chosen))


def _schema_path_error(path: list[str], overrides: Sequence[str]) -> ConfigError | None:
    from prism.framework.config import SELECTED_KINDS, PrismConfig

    schema: type = PrismConfig
    for depth, part in enumerate(path):
        names = [f.name for f in dataclasses.fields(schema)]
        if part not in names:
            return _unknown_key(".".join(path[:depth]), part, names, schema)
        kind = _field_types(schema).get(part)
        if depth == 0 and part in SELECTED_KINDS:
            kind = _plugin_schema(part, overrides)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None  # a value, or a free-form node: Hydra (or the code reading it) judges the rest
        schema = kind
    return None


def _is_group(key: str) -> bool:
    from prism.framework.config import CONF_DIR, SELECTED_KINDS

    return "/" in key or ("." not in key and (key in SELECTED_KINDS or (CONF_DIR / key).is_dir()))


def check_added_keys(overrides: Sequence[str]) -> None:
    """Refuse ``+key=value`` / ``++key=value`` overrides that add a key no schema declares (``+train.epoch=3``),
    naming close matches. Config groups (``+experiment=NAME``, ``+hydra/sweeper=...``), ``hydra.*`` keys and
    keys under free-form nodes (``+evals.knn.task=knn``) are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in overrides:
        if not arg.startswith("+") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:  # Hydra reports malformed overrides itself
            continue
        key = override.key_or_group
        if override.package or _is_group(key) or key == "hydra" or key.startswith("hydra."):
            continue
        error = _schema_path_error(key.split("."), overrides)
        if error is not None:
            raise ConfigError(f"override '{arg}': {error}")


def iter_schema_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """``(dotted key, field, resolved type)`` for every leaf field of ``schema``, nested dataclasses expanded."""
    types = _field_types(schema)
    for f in dataclasses.fields(schema):
        kind = types.get(f.name, f.type)
        key = f"{prefix}{f.name}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            yield from iter_schema_fields(kind, f"{key}.")
        else:
            yield key, f, kind
