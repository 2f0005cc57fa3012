"""Registry unit tests on private ``Registry("widget")`` instances (the global registries stay untouched)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from prism.framework.errors import DuplicateNameError, PrismError, UnknownNameError
from prism.framework.registry import MODELS, OPTIMIZERS, REGISTRIES, Entry, Registry, registry_for


@dataclass
class WidgetConfig:
    size: int = 3
    color: str = "red"


@pytest.fixture
def widgets() -> Registry:
    return Registry("widget")


def _builder(cfg, **kwargs):
    """Build a widget.

    More text that is not part of the description.
    """
    return ("built", cfg, kwargs)


def test_register_records_builder_config_description_and_metadata(widgets):
    returned = widgets.register("gear", config=WidgetConfig, description="A toothed wheel.", teeth=12)(_builder)

    assert returned is _builder  # the decorator hands the builder back unchanged
    entry = widgets.get("gear")
    assert isinstance(entry, Entry)
    assert (entry.kind, entry.name, entry.builder, entry.config) == ("widget", "gear", _builder, WidgetConfig)
    assert entry.description == "A toothed wheel."
    assert entry.module == __name__
    assert entry.metadata == {"teeth": 12}
    assert entry.default_config() == WidgetConfig(size=3, color="red")
    assert "gear" in widgets and "cog" not in widgets
    assert len(widgets) == 1 and list(widgets) == ["gear"]


def test_description_defaults_to_first_docstring_line(widgets):
    widgets.register("gear", config=WidgetConfig)(_builder)

    @widgets.register("bare")
    def build_bare():
        return "bare"

    assert widgets.get("gear").description == "Build a widget."
    assert widgets.get("bare").description == ""
    assert widgets.get("bare").config is None
    assert widgets.get("bare").default_config() is None


def test_build_passes_default_or_given_config_and_kwargs(widgets):
    widgets.register("gear", config=WidgetConfig)(_builder)
    widgets.register("bare")(lambda **kw: ("bare", kw))

    assert widgets.build("gear", rngs=1) == ("built", WidgetConfig(), {"rngs": 1})
    assert widgets.build("gear", WidgetConfig(size=7)) == ("built", WidgetConfig(size=7), {})
    assert widgets.build("bare", data=2) == ("bare", {"data": 2})


def test_unknown_name_lists_kind_close_matches_and_all_names(widgets):
    for name in ("resnet18", "resnet50", "vit_base"):
        widgets.register(name, config=WidgetConfig)(_builder)

    with pytest.raises(UnknownNameError) as info:
        widgets.get("resnet5")
    message = str(info.value)

    assert isinstance(info.value, PrismError) and isinstance(info.value, KeyError)
    assert message.startswith("unknown widget 'resnet5'.")
    assert "Did you mean: resnet50, resnet18?" in message  # best match first
    assert "Registered widgets: resnet18, resnet50, vit_base." in message
    assert not message.startswith('"')  # not KeyError's quoted repr


def test_unknown_name_without_close_match_has_no_suggestion(widgets):
    widgets.register("gear")(_builder)

    with pytest.raises(UnknownNameError) as info:
        widgets.get("zzzzzzzz")
    assert "Did you mean" not in str(info.value)
    assert "Registered widgets: gear." in str(info.value)


def test_unknown_name_in_empty_registry(widgets):
    with pytest.raises(UnknownNameError, match=r"Registered widgets: \(none\)"):
        widgets.get("gear")


def test_duplicate_name_raises_and_override_replaces(widgets):
    widgets.register("gear", config=WidgetConfig)(_builder)

    def other(cfg):
        """Another gear."""

    with pytest.raises(DuplicateNameError) as info:
        widgets.register("gear", config=WidgetConfig)(other)
    message = str(info.value)
    assert "widget 'gear' is already registered" in message
    assert "override=True" in message
    assert widgets.get("gear").builder is _builder  # the failed registration changed nothing

    widgets.register("gear", config=WidgetConfig, override=True)(other)
    assert widgets.get("gear").builder is other
    assert widgets.get("gear").description == "Another gear."


def test_registering_the_same_builder_twice_is_harmless(widgets):
    widgets.register("gear", config=WidgetConfig)(_builder)
    widgets.register("gear", config=WidgetConfig)(_builder)  # e.g. a module imported twice
    assert widgets.names() == ["gear"]


def test_config_must_be_a_dataclass(widgets):
    class NotADataclass:
        size = 3

    with pytest.raises(TypeError, match="widget 'gear': config must be a dataclass"):
        widgets.register("gear", config=NotADataclass)
    with pytest.raises(TypeError):
        widgets.register("gear", config=WidgetConfig())  # an instance is not the class
    assert "gear" not in widgets


def test_unregister(widgets):
    widgets.register("gear")(_builder)
    widgets.unregister("gear")
    widgets.unregister("never-registered")  # no error
    assert widgets.names() == []


def test_names_are_sorted_and_filtered_by_shell_pattern(widgets):
    for name in ("vit_base", "resnet50", "resnet18", "convnext", "resmlp"):
        widgets.register(name)(_builder)

    assert widgets.names() == ["convnext", "resmlp", "resnet18", "resnet50", "vit_base"]
    assert widgets.names("res*") == ["resmlp", "resnet18", "resnet50"]
    assert widgets.names("resnet?0") == ["resnet50"]
    assert widgets.names("*_base") == ["vit_base"]
    assert widgets.names("efficientnet*") == []
    assert [e.name for e in widgets.entries()] == widgets.names()


def test_plural_and_repr():
    assert Registry("widget").plural == "widgets"
    assert Registry("mouse", plural="mice").plural == "mice"
    assert repr(Registry("widget")) == "Registry('widget', 0 entries)"


def test_registry_for_singular_and_plural():
    assert registry_for("model") is MODELS
    assert registry_for("models") is MODELS
    assert registry_for("optimizers") is OPTIMIZERS
    for kind, registry in REGISTRIES.items():
        assert registry_for(kind) is registry
        assert registry_for(registry.plural) is registry


def test_registry_for_misspelt_kind():
    with pytest.raises(UnknownNameError) as info:
        registry_for("modle")
    message = str(info.value)
    assert "unknown plugin kind 'modle'." in message
    assert "Did you mean: model?" in message
    assert "Kinds: model, objective, task, dataset" in message

    with pytest.raises(UnknownNameError, match="unknown plugin kind 'widgetz'") as info:
        registry_for("widgetz")
    assert "Did you mean" not in str(info.value)


def test_global_registration_is_visible_and_removable():
    """Registering on a global registry works at run time (notebooks); tests must clean up."""

    @dataclass
    class ProbeConfig:
        depth: int = 2

    try:
        MODELS.register("_test_registry_probe", config=ProbeConfig, description="probe")(_builder)
        assert "_test_registry_probe" in MODELS.names("_test_registry_*")
        assert MODELS.get("_test_registry_probe").default_config() == ProbeConfig(depth=2)
    finally:
        MODELS.unregister("_test_registry_probe")
    assert "_test_registry_probe" not in MODELS
