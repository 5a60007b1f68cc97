"""Routing policies in the running app (dp 2, the session's Ray): prefix-aware routing keeps
requests that share a prompt prefix on the replica that cached it, and every policy gives
HF's greedy text."""
from __future__ import annotations

import random

import httpx
import pytest

from raylm.dp.prefix import cached_blocks, prefix_hashes
from tests.conftest import hf_greedy
from tests.serve_load import continuation, served_app
from tests.waiting import wait_for

pytestmark = pytest.mark.slow

MAX_TOKENS = 4


def _coordinator_table() -> dict:
    """The DP coordinator's table (what the routers follow)."""
    import ray

    found = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if "dp_coordinator" in a["name"]]
    assert len(found) == 1, found
    actor = ray.get_actor(found[0]["name"], namespace=found[0]["namespace"])
    return ray.get(actor.snapshot.remote(-1, 0.0), timeout=30)[1]


def _complete(base: str, prompt) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    r = httpx.post(base + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.timeout(300)
def test_prefix_aware_routing_keeps_a_shared_prefix_on_one_replica(tiny_root, ray_session):
    """8 requests sharing a 64-token prefix (4 KV blocks), one at a time over 2 idle
    replicas: once the first one's replica has reported the prefix, the other 7 follow it
    there (least-loaded would split them by coin flips); each reuses the cached blocks."""
    rng = random.Random(11)
    shared = rng.choices(range(5, 200), k=64)
    prompts = [shared + rng.choices(range(5, 200), k=5) for _ in range(8)]
    with served_app(tiny_root, dp=2, routing_policy="prefix_aware", block_size=16) as (path, base):
        texts = [_complete(base, prompts[0])]
        hashes = prefix_hashes(prompts[0], 16)
        wait_for(lambda: any(cached_blocks(hashes, s.get("prefix_blocks", ())) == 4
                             for s in _coordinator_table().values()), 30,
                 "the shared prefix in a replica's summary at the coordinator")
        before = _cache_counters()
        texts += [_complete(base, p) for p in prompts[1:]]
        grew = wait_for(lambda: _grown(before, 7 * len(prompts[1])), 30,
                        "the 7 requests in the engines' reports",
                        detail=lambda: _grown(before, None))
        expected = [continuation(path, p, ids)
                    for p, ids in zip(prompts, hf_greedy(path, prompts, MAX_TOKENS))]
        assert texts == expected
    served = [key for key, (queries, _) in grew.items() if queries > 0]
    assert len(served) == 1, grew
    assert grew[served[0]][1] == 7 * 64, grew  # every one found the whole prefix cached


def _cache_counters() -> dict:
    """Replica -> (prompt tokens looked up in its prefix cache, tokens found), as reported."""
    return {key: (s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0))
            for key, s in _coordinator_table().items()}


def _grown(before: dict, total):
    """What each replica's counters grew by since `before`; None until the lookups add up to
    `total` (reports arrive on the next push after a request ends)."""
    now = _cache_counters()
    grew = {k: (q - before.get(k, (0, 0))[0], h - before.get(k, (0, 0))[1])
            for k, (q, h) in now.items()}
    return grew if total is None or sum(q for q, _ in grew.values()) == total else None


@pytest.mark.timeout(300)
def test_simulated_replicas_hosting_two_engines_each_serve_every_rank(tiny_root, ray_session):
    """dp 2 with 2 simulated engines per replica: 4 DP ranks in the coordinator's table, two
    per replica process; a request pinned to each rank runs on that engine (its prompt shows
    in that engine's prefix-cache lookups, nowhere else), and unpinned ones complete."""
    prompts = [[7] * (20 + 8 * rank) for rank in range(4)]
    with served_app(tiny_root, dp=2, executor="sim", sim_device="h100",
                    engines_per_replica=2) as (_, base):
        wait_for(lambda: len(_coordinator_table()) == 4, 60, "4 engines reporting")
        table = _coordinator_table()
        assert sorted(s["dp_rank"] for s in table.values()) == [0, 1, 2, 3]
        assert len({s["pid"] for s in table.values()}) == 2  # two engines per process
        for rank, prompt in enumerate(prompts):
            before = _cache_counters()
            body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                    "ignore_eos": True}
            r = httpx.post(base + "/v1/completions", json=body,
                           headers={"X-data-parallel-rank": str(rank)}, timeout=60)
            assert (r.status_code == 200 and r.json()["usage"]["completion_tokens"]
                    == MAX_TOKENS), r.text
            grew = wait_for(lambda: _grown(before, len(prompt)), 30,
                            f"rank {rank}'s lookup reported", detail=lambda: _grown(before, None))
            ranks = {table[k]["dp_rank"] for k, (q, _) in grew.items() if q > 0}
            assert ranks == {rank}, grew
        for prompt in prompts:
            assert _complete(base, prompt + [9]) is not None
