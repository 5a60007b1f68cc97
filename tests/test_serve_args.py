"""The serving builder's options (ServeArgs) and `raylm serve`'s flags, without starting Ray."""
from __future__ import annotations

import pytest

from raylm.deployments.openai import ServeArgs


def test_api_key_defaults_to_the_environment_and_never_shows_in_repr(monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-from-env")
    assert ServeArgs().api_key == "sk-from-env"
    assert ServeArgs(api_key="sk-flag").api_key == "sk-flag"  # the flag wins
    assert "sk-" not in repr(ServeArgs()) and "sk-" not in str(ServeArgs())
    monkeypatch.delenv("RAYLM_API_KEY")
    assert ServeArgs().api_key is None


@pytest.mark.parametrize("fields, word", [
    ({"dp": 2, "pp": 2, "enable_expert_parallel": True}, "pp=1"),
    ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}, "enable_expert_parallel": True}, "elastic"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
])
def test_bad_combinations_are_clear_errors(fields, word):
    with pytest.raises(ValueError, match=word):
        ServeArgs(**fields)
