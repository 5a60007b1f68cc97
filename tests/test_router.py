"""The router's bookkeeping between coordinator reports, by hand (no Serve needed)."""
from collections import defaultdict
from types import SimpleNamespace

import asyncio

from collections import deque

from raylm.dp.router import REPORT_LAG_S, WAITING_WEIGHT, DPRouter, _Routed


def test_a_report_absorbs_only_requests_routed_well_before_it():
    r = SimpleNamespace(_delta=defaultdict(int), _outstanding=defaultdict(list), _chosen={})
    t = 100.0
    r._outstanding.update({"old": [_Routed("A", WAITING_WEIGHT, t - 1.0)],
                           "new": [_Routed("A", WAITING_WEIGHT, t - REPORT_LAG_S / 2)],
                           "other": [_Routed("B", WAITING_WEIGHT, t - 1.0)]})
    r._delta.update({"A": 2 * WAITING_WEIGHT, "B": WAITING_WEIGHT})
    DPRouter._absorb_report(r, "A", computed_at=t)
    # "old" is in the report (its running slot, 1, comes off when it completes); "new" may
    # not have reached the replica when the report was computed: it keeps its +4
    assert r._delta["A"] == WAITING_WEIGHT and r._delta["B"] == WAITING_WEIGHT
    assert (r._outstanding["old"][0].weight == 1 and r._outstanding["new"][0].weight
            == WAITING_WEIGHT)
    DPRouter.on_request_completed(r, SimpleNamespace(unique_id="A"), "old")
    DPRouter.on_request_completed(r, SimpleNamespace(unique_id="A"), "new")
    assert r._delta["A"] == -1 and "old" not in r._outstanding


def _router():
    r = object.__new__(DPRouter)  # Serve's constructor needs a running deployment
    r.initialize_state()
    return r


def _replica(key, rank=None):
    stats = {} if rank is None else {"dp_rank": rank}
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=key), routing_stats=stats)


def _pending(rid, rank=None, future=None):
    kwargs = {} if rank is None else {"data_parallel_rank": rank}
    return SimpleNamespace(kwargs=kwargs, metadata=SimpleNamespace(internal_request_id=rid),
                           future=future)


def _first_choice(r, replicas, pending):
    ranked = asyncio.run(r.choose_replicas(replicas, pending))
    return ranked[0][0].replica_id.unique_id if ranked and ranked[0] else None


def test_a_burst_chosen_before_any_confirmation_spreads_evenly():
    """Serve confirms a routing only after a round trip to the replica; 16 requests chosen
    before any confirmation must still alternate (each counts where it was chosen)."""
    r, replicas = _router(), [_replica("A"), _replica("B")]
    pending = [_pending(f"r{i}") for i in range(16)]
    firsts = [_first_choice(r, replicas, p) for p in pending]
    assert firsts.count("A") == firsts.count("B") == 8, firsts
    # confirmed elsewhere (A refused, B took it): the count moves with it
    DPRouter.on_request_routed(r, pending[0], SimpleNamespace(unique_id="B"), None)
    moved = 1 if firsts[0] == "A" else 0
    assert (r._delta["A"], r._delta["B"]) == (WAITING_WEIGHT * (8 - moved),
                                              WAITING_WEIGHT * (8 + moved))
    DPRouter.on_request_completed(r, SimpleNamespace(unique_id="B"), "r0")
    assert r._delta["A"] + r._delta["B"] == WAITING_WEIGHT * 15


def test_a_choice_goes_to_the_request_it_was_made_for():
    """Serve calls _fulfill_next_pending_request with the metadata of the request a choice
    was made for. It must reach that request: not the oldest pending one (pinned to another
    rank here), and not a sibling sharing its internal id (every handle call made while
    serving one HTTP request shares it: a multi-prompt completion)."""
    async def run():
        loop = asyncio.get_running_loop()
        r, rank1 = _router(), _replica("B", rank=1)
        older = _pending("http-1", rank=0, future=loop.create_future())
        siblings = [_pending("http-2", rank=1, future=loop.create_future()) for _ in range(2)]
        r._pending_requests_to_fulfill = deque([older, *siblings])
        r._pending_requests_by_id = {"http-1": older, "http-2": siblings[0]}
        r._record_queue_wait_time = lambda pr: None
        for p in reversed(siblings):
            r._fulfill_next_pending_request(rank1, p.metadata)
        assert [p.future.result() for p in siblings] == [rank1, rank1]
        assert not older.future.done()
        # the same replica routed twice under one id: each completion takes back its own count
        for p in siblings:
            DPRouter.on_request_routed(r, p, rank1.replica_id, None)
        assert r._delta["B"] == 2 * WAITING_WEIGHT
        for _ in siblings:
            DPRouter.on_request_completed(r, rank1.replica_id, "http-2")
        assert r._delta["B"] == 0 and not r._outstanding

    asyncio.run(run())


def test_a_pinned_request_waits_for_a_starting_replicas_rank(monkeypatch):
    """Just after start a replica may not have reported its DP rank yet: a request pinned to
    that rank waits for it instead of going to another rank by load. When every rank is known
    and none matches (the pinned replica died), it is routed by load at once; an unknown
    rank is waited for only until PIN_WAIT_S."""
    import raylm.dp.router as router

    async def run():
        r, a, b = _router(), _replica("A", rank=0), _replica("B")  # B has not reported
        choice = asyncio.ensure_future(r.choose_replicas([a, b], _pending("x", rank=1)))
        await asyncio.sleep(0)  # the router is now waiting on B's rank
        assert not choice.done()
        b.routing_stats["dp_rank"] = 1  # B reports
        assert await asyncio.wait_for(choice, 30) == [[b]]
        monkeypatch.setattr(router, "PIN_WAIT_S", 1000.0)
        gone = await asyncio.wait_for(r.choose_replicas([a], _pending("y", rank=1)), 30)
        assert gone == [[a]]  # no replica has rank 1: by load, no wait
        monkeypatch.setattr(router, "PIN_WAIT_S", 0.0)
        late = await asyncio.wait_for(r.choose_replicas([a, _replica("C")], _pending("z", rank=1)),
                                      30)
        assert len(late[0]) == 1  # deadline passed: by load

    asyncio.run(run())


def test_replicas_hosting_several_engines_are_routed_per_engine():
    """A replica hosting two simulated engines has two table entries (`A/0`, `A/1`): a burst
    of 8 over two such replicas puts 2 on each engine, names the engine in the call, and the
    count follows the engine through confirmation and completion. A pinned rank goes to the
    engine holding it."""
    r, replicas = _router(), [_replica("A"), _replica("B")]
    r._table = {f"{rep}/{i}": {"replica": rep, "engine_index": i, "dp_rank": 2 * n + i,
                               "num_waiting": 0, "num_running": 0} for n, rep in enumerate("AB")
                for i in range(2)}
    pending = [_pending(f"r{i}") for i in range(8)]
    firsts = [_first_choice(r, replicas, p) for p in pending]
    chosen = [f"{rep}/{p.kwargs['engine_index']}" for rep, p in zip(firsts, pending)]
    assert sorted(chosen) == sorted(2 * list(r._table)), chosen
    assert {k: r._delta[k] for k in r._table} == dict.fromkeys(r._table, 2 * WAITING_WEIGHT)
    DPRouter.on_request_routed(r, pending[0], SimpleNamespace(unique_id=firsts[0]), None)
    DPRouter.on_request_completed(r, SimpleNamespace(unique_id=firsts[0]), "r0")
    assert r._delta[chosen[0]] == WAITING_WEIGHT  # the other request chosen there still counts
    pinned = _pending("p", rank=3)
    assert _first_choice(r, replicas, pinned) == "B" and pinned.kwargs["engine_index"] == 1
