"""When an engine replica pushes its load to the DP coordinator, by hand (no Serve needed)."""
from types import SimpleNamespace

from raylm.dp.policies import ROUTING_POLICIES
from raylm.serve.llm_server import BOOKKEEPING_PUSH_S, HEARTBEAT_S, PUSH_INTERVAL_S, LLMServer

LAST = {"num_waiting": 0, "num_running": 16, "num_free_blocks": 900, "dp_rank": 0,
        "dp_running": None, "dp_dummy_steps": None, "dp_experts": None, "prefix_version": 7}


def _due(load, since, last=LAST, prefix_routing=False) -> bool:
    server = SimpleNamespace(_bookkeeping_push_s=PUSH_INTERVAL_S if prefix_routing
                             else BOOKKEEPING_PUSH_S)
    return LLMServer._push_due(server, load, last, since)


def test_routing_load_goes_out_at_the_next_tick_bookkeeping_waits_unless_prefixes_route():
    assert _due(LAST, 0.0, last=None)  # nothing pushed yet
    assert not _due(dict(LAST), PUSH_INTERVAL_S) and _due(dict(LAST), HEARTBEAT_S + 0.01)
    for change in ({"num_running": 15}, {"num_waiting": 1}, {"dp_rank": 1}, {"dp_dummy_steps": 3}):
        assert _due({**LAST, **change}, PUSH_INTERVAL_S), change
    book = {**LAST, "num_free_blocks": 890, "prefix_version": 8}  # every step under load
    assert not _due(book, PUSH_INTERVAL_S) and not _due(book, BOOKKEEPING_PUSH_S - 0.01)
    assert _due(book, BOOKKEEPING_PUSH_S)
    assert _due(book, PUSH_INTERVAL_S, prefix_routing=True)  # prefix_aware reads the summary
    assert [name for name, cls in ROUTING_POLICIES.items()
            if cls.reads_prefixes] == ["prefix_aware"]
