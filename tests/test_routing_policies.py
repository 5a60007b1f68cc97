"""Routing policies and prefix summaries, deterministically and without Serve: the real
DPRouter over fake replicas whose reports (load, prefix summary) are set by hand, and the
engine's prefix summary checked against the hashes a router computes for the same prompt."""
import asyncio
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from raylm.dp.policies import ROUTING_POLICIES, Candidate, create_routing_policy
from raylm.dp.prefix import SUMMARY_STRIDE, cached_blocks, is_summary_depth, prefix_hashes
from raylm.dp.router import DPRouter
from raylm.engine.block_pool import BlockPool

BLOCK = 4


def _router(policy="least_loaded", seed=0, **options):
    r = object.__new__(DPRouter)  # Serve's constructor needs a running deployment
    r.initialize_state(policy=policy, rng=random.Random(seed), **options)
    return r


def _replica(key):
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=key), routing_stats={})


def _report(r, key, waiting=0, running=0, prompt=None, depth=None):
    """What `key`'s engine reports: its queues and, given a prompt, a summary of its first
    `depth` blocks (the engine's rule: summary depths only)."""
    stats = {"num_waiting": waiting, "num_running": running, "block_size": BLOCK}
    if prompt is not None:
        hashes = prefix_hashes(prompt, BLOCK)[:depth]
        stats["prefix_blocks"] = frozenset(h for d, h in enumerate(hashes, 1)
                                           if is_summary_depth(d))
    r._table[key] = stats


def _route(r, replicas, n, prompt=(1, 2, 3)):
    """The first choices for `n` requests, each chosen before any is confirmed (a burst)."""
    def one(i):
        pending = SimpleNamespace(kwargs={"prompt_token_ids": list(prompt)},
                                  metadata=SimpleNamespace(internal_request_id=f"r{i}"))
        return asyncio.run(r.choose_replicas(replicas, pending))[0][0].replica_id.unique_id
    return [one(i) for i in range(n)]


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin", "prefix_aware"])
@pytest.mark.parametrize("n_replicas", [2, 4, 7])
def test_a_burst_over_idle_replicas_spreads_evenly(policy, n_replicas):
    """N requests chosen before any confirmation (each counts where it was chosen at once)
    over R idle replicas: N/R each."""
    replicas = [_replica(f"R{i}") for i in range(n_replicas)]
    counts = Counter(_route(_router(policy), replicas, 6 * n_replicas))
    assert sorted(counts) == sorted(r.replica_id.unique_id for r in replicas)
    assert set(counts.values()) == {6}, counts


def test_power_of_two_takes_the_idler_of_two_random_replicas():
    candidates = [Candidate(f"R{i}", load) for i, load in enumerate([5, 0, 9, 2, 2, 7, 1])]
    for seed in range(50):
        drawn = random.Random(seed).sample(candidates, 2)  # the policy's first use of its rng
        first = create_routing_policy("power_of_two",
                                      rng=random.Random(seed)).order(candidates, ())[0]
        assert first in drawn and first.load == min(c.load for c in drawn)


@pytest.mark.parametrize("policy", ["least_loaded", "power_of_two", "prefix_aware"])
def test_a_busy_replica_gets_nothing_while_others_score_lower(policy):
    r, replicas = _router(policy), [_replica(k) for k in "ABC"]
    # score 48: more than the 8 requests below add to B and C
    _report(r, "A", waiting=10, running=8)
    assert "A" not in _route(r, replicas, 8)


def test_round_robin_ignores_load():
    r, replicas = _router("round_robin"), [_replica(k) for k in "ABC"]
    _report(r, "A", waiting=10, running=8)
    assert _route(r, replicas, 6) == ["A", "B", "C", "A", "B", "C"]


def test_prefix_aware_follows_the_cache_unless_its_holder_is_overloaded():
    prompt = list(range(100, 100 + 9 * BLOCK + 2))  # 9 full blocks
    r, replicas = _router("prefix_aware", max_imbalance=8), [_replica(k) for k in "ABC"]
    _report(r, "A")
    # holds 8 blocks to the summary's resolution
    _report(r, "B", running=3, prompt=prompt, depth=9)
    _report(r, "C", prompt=prompt, depth=3)  # holds 2
    assert _route(r, replicas, 1, prompt) == ["B"]  # the longest prefix, though not the idlest
    r._delta.clear()
    _report(r, "B", waiting=2, running=1, prompt=prompt, depth=9)  # score 9 > 0 + 8
    assert _route(r, replicas, 1, prompt) == ["C"]  # the longest prefix within the bound
    assert _route(r, replicas, 1, [7] * 40) == ["A"]  # no replica holds it: least loaded


def test_unknown_policy_names_the_known_ones():
    known = ", ".join(ROUTING_POLICIES)
    named = rf"routing policy must be one of {known} \(got 'fastest'\)"
    with pytest.raises(ValueError, match=named):
        create_routing_policy("fastest")


def test_block_pool_summary_follows_caching_and_eviction():
    pool, hashes = BlockPool(32), prefix_hashes(list(range(20 * BLOCK)), BLOCK)
    blocks = pool.get_new_blocks(20)
    for depth, (block, h) in enumerate(zip(blocks, hashes), 1):
        pool.cache_block(block, h, depth=depth)
    version, summary = pool.prefix_summary()
    summarized = [d for d in range(1, 21) if is_summary_depth(d)]
    assert summarized == [1, 2, 4, SUMMARY_STRIDE, 2 * SUMMARY_STRIDE]
    assert summary == {hashes[d - 1] for d in summarized}
    assert cached_blocks(hashes, summary) == 16 and cached_blocks(hashes[:15], summary) == 8
    pool.free_blocks(reversed(blocks))  # tail first: the deepest blocks are evicted first
    pool.get_new_blocks(32 - 20 + 5)  # the 12 never used, then 5 of the request's tail
    later, summary = pool.prefix_summary()
    assert later == version + 1 and cached_blocks(hashes, summary) == 8
    assert pool.prefix_summary(known_version=later) == (later, None)  # unchanged: nothing copied


def test_the_engines_summary_matches_the_routers_hashes(tiny_llama):
    """A served prompt's prefix, hashed the router's way, is found in the engine's summary."""
    from raylm import LLM, SamplingParams

    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=128, num_blocks=64, block_size=16)
    prompt = random.Random(3).choices(range(5, 200), k=70)  # 4 full blocks of 16
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    block_size, _, summary = llm.engine.core.prefix_summary()
    assert block_size == 16
    assert cached_blocks(prefix_hashes(prompt, 16), summary) == 4
    assert cached_blocks(prefix_hashes(prompt[:30] + [1] * 40, 16), summary) == 1


def test_block_hashes_are_the_same_in_every_process():
    """Routers hash prompts in the ingress process, engines theirs: the hashes must agree
    (hash(None), once the first block's parent, differs between processes before 3.12)."""
    import subprocess
    import sys

    code = "from raylm.dp.prefix import prefix_hashes; print(prefix_hashes(list(range(40)), 16))"
    others = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout
              for _ in range(2)}
    assert others == {f"{prefix_hashes(list(range(40)), 16)}\n"}


def test_routers_get_only_what_changed_and_keep_summaries_they_hold():
    """The coordinator's long poll sends the entries reported since the router's version,
    with a prefix summary only where that changed too; the router merges them into its table
    (keeping summaries it holds) and drops replicas the coordinator no longer has."""
    from raylm.dp.coordinator import DPCoordinator

    async def run():
        c, r = DPCoordinator(), _router("prefix_aware")
        await c.report("A",
                       {"num_running": 1, "prefix_blocks": frozenset({1}), "prefix_version": 1})
        await c.report("B",
                       {"num_running": 2, "prefix_blocks": frozenset({2}), "prefix_version": 1})
        v, changed, keys = await c.changes(-1, 0.0)
        assert sorted(changed) == ["A", "B"] and changed["A"]["prefix_blocks"] == {1}
        r._merge(changed, keys)
        await c.report("A", {"num_running": 3})  # load only: the summary is held
        v2, changed, keys = await c.changes(v, 0.0)
        assert list(changed) == ["A"] and "prefix_blocks" not in changed["A"]
        r._merge(changed, keys)
        assert r._table["A"]["num_running"] == 3 and r._table["A"]["prefix_blocks"] == {1}
        await c.report("B",
                       {"num_running": 2, "prefix_blocks": frozenset({2, 3}), "prefix_version": 2})
        await c.remove("A")
        _, changed, keys = await c.changes(v2, 0.0)
        assert list(changed) == ["B"] and changed["B"]["prefix_blocks"] == {2, 3} and keys == ["B"]
        r._merge(changed, keys)
        assert list(r._table) == ["B"] and r._table["B"]["prefix_blocks"] == {2, 3}

    asyncio.run(run())
