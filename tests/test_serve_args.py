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


def test_serve_flags_reach_the_admission_auth_and_shutdown_options():
    from raylm.cli import build_parser
    from raylm.serve.launcher import serve_args

    argv = ["serve", "--max-ongoing-requests", "40", "--max-waiting-requests", "8", "--request-timeout", "12.5",
            "--shutdown-timeout", "3", "--open-paths", "/health", "/metrics"]
    a = serve_args(build_parser().parse_args(argv))
    assert (a.max_ongoing_requests, a.max_waiting_requests, a.request_timeout, a.shutdown_timeout) == (40, 8, 12.5, 3)
    assert a.engine_config().scheduler.max_waiting_requests == 8
    assert a.ingress_options() == {"api_key": a.api_key, "open_paths": ["/health", "/metrics"],
                                   "max_body_bytes": 1 << 20, "max_ongoing_requests": 40, "request_timeout": 12.5}
    defaults = serve_args(build_parser().parse_args(["serve"]))
    assert defaults.open_paths == ["/health", "/ping", "/version"] and defaults.request_timeout is None


@pytest.mark.parametrize("fields, word", [
    ({"max_ongoing_requests": 0}, "max_ongoing_requests"), ({"max_waiting_requests": -1}, "max_waiting_requests"),
    ({"request_timeout": 0}, "request_timeout"), ({"shutdown_timeout": -1}, "shutdown_timeout"),
])
def test_bad_limits_are_clear_errors(fields, word):
    with pytest.raises(ValueError, match=word):
        ServeArgs(**fields)
