"""The one registry behind attention backends, routing policies, grammar backends and tool
parsers: names in registration order, and an unknown name names the option and the known."""
import pytest

from raylm.registry import Registry


def test_registry_files_classes_by_name_and_names_the_known_ones_on_a_miss():
    parts = Registry("widget_backend")

    @parts.register("b")
    class B:
        pass

    @parts.register("a")
    class A:
        pass

    assert parts.names() == ["b", "a"] and parts.lookup("a") is A and A.name == "a"
    with pytest.raises(ValueError, match=r"widget_backend must be one of b, a \(got 'c'\)"):
        parts.lookup("c")
    with pytest.raises(ValueError, match=r"must be one of auto, b, a \(got 'c'\)"):
        parts.lookup("c", ["auto", *parts.names()])
