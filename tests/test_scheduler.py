"""Scheduler: exact block ids and token counts worked out by hand (block size 4), driven by a
fake model that mirrors worker state from SchedulerOutput diffs only; plus a seeded stress run."""
from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional

import pytest

from raylm.config import CacheConfig, SchedulerConfig
from raylm.engine.request import Request, RequestStatus
from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.engine.scheduler import Scheduler
from raylm.sampling_params import SamplingParams

BS = 4
EOS = 0


def cdiv(a, b):
    return -(-a // b)


def next_token(tokens: List[int]) -> int:
    """The fake model: a deterministic function of the whole sequence (never EOS)."""
    return 1 + (sum(tokens) * 31 + len(tokens) * 7) % 97


def make_sched(num_blocks, budget=64, threshold=512, max_num_seqs=16, max_model_len=64,
               caching=True):
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                        long_prefill_token_threshold=threshold),
        CacheConfig(block_size=BS, enable_prefix_caching=caching), num_blocks, max_model_len)


def make_req(rid, prompt, max_tokens=16, eos: Optional[int] = None, min_tokens=0,
             stop_token_ids=None):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=min_tokens,
                            stop_token_ids=stop_token_ids)
    params.all_stop_token_ids = ({eos} if eos is not None else set()) | set(params.stop_token_ids)
    return Request(rid, list(prompt), params)


class FakeWorker:
    """Keeps per-request state from SchedulerOutput alone (as a remote worker would), checks it
    against the scheduler, and samples `model(tokens)` for each request whose scheduled tokens
    reach its end (num_computed_tokens + scheduled == num_tokens)."""

    def __init__(self, sched: Scheduler, model: Callable[[List[int]], int] = next_token) -> None:
        self.sched, self.model = sched, model
        self.state: Dict[str, dict] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids:
            self.state.pop(rid, None)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.state
            self.state[new.req_id] = dict(tokens=list(new.prompt_token_ids)
                                          + list(new.output_token_ids), blocks=list(new.block_ids),
                                          computed=new.num_computed_tokens)
        c = out.scheduled_cached_reqs
        for rid, toks, blocks, computed in zip(c.req_ids, c.new_token_ids, c.new_block_ids,
                                               c.num_computed_tokens):
            st = self.state[rid]
            assert (st["computed"] == computed), ("worker and scheduler disagree on "
                                                  "num_computed_tokens")
            st["tokens"].extend(toks)
            st["blocks"].extend(blocks)
        assert set(out.num_scheduled_tokens) == ({n.req_id for n in out.scheduled_new_reqs}
                                                 | set(c.req_ids))
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            st, request = self.state[rid], self.sched.requests[rid]
            assert st["tokens"] == request.all_token_ids
            assert st["blocks"] == self.sched.kv.block_ids(rid)
            assert st["computed"] == request.num_computed_tokens
            assert 1 <= n and st["computed"] + n <= len(st["tokens"])
            assert len(st["blocks"]) * BS >= st["computed"] + n  # room for every scheduled token
            reaches_end = st["computed"] + n == len(st["tokens"])
            sampled[rid] = [self.model(st["tokens"])] if reaches_end else []
            st["computed"] += n
        return ModelRunnerOutput(sampled)


class Driver:
    def __init__(self, sched: Scheduler, model=next_token) -> None:
        self.sched = sched
        self.worker = FakeWorker(sched, model)
        self.outputs: Dict[str, List[int]] = {}
        self.finish: Dict[str, Optional[str]] = {}
        self.stop_reason: Dict[str, object] = {}
        self.num_cached: Dict[str, int] = {}

    def add(self, *requests: Request) -> None:
        for r in requests:
            self.sched.add_request(r)
            self.outputs[r.request_id] = []

    def step(self) -> SchedulerOutput:
        out = self.sched.schedule()
        check_invariants(self.sched, out)
        for o in self.sched.update_from_output(out, self.worker.execute(out)):
            self.outputs[o.request_id].extend(o.new_token_ids)
            self.num_cached[o.request_id] = o.num_cached_tokens
            if o.finished:
                self.finish[o.request_id] = o.finish_reason
                self.stop_reason[o.request_id] = o.stop_reason
        check_invariants(self.sched)
        return out

    def run(self, max_steps=1000) -> int:
        steps = 0
        while self.sched.has_unfinished_requests():
            self.step()
            steps += 1
            assert steps <= max_steps, "scheduler did not finish"
        assert_all_free(self.sched)
        return steps


def check_invariants(sched: Scheduler, out: Optional[SchedulerOutput] = None) -> None:
    kv, pool = sched.kv, sched.kv.pool
    holders: Dict[int, int] = {}
    for rid, blocks in kv.req_to_blocks.items():
        assert rid in sched.requests
        assert len({b.block_id for b in blocks}) == len(blocks)
        for b in blocks:
            holders[b.block_id] = holders.get(b.block_id, 0) + 1
    for block in pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), f"block {block.block_id}"
        assert (block.ref_cnt == 0) == (block.block_id in pool.free_queue)
    assert len(holders) + kv.num_free_blocks == kv.num_blocks
    for h, block in pool.cached.items():
        assert block.block_hash == h
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING and r.request_id in kv.req_to_blocks
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.request_id not in kv.req_to_blocks and r.num_computed_tokens == 0
    assert len(sched.running) + len(sched.waiting) == len(sched.requests)
    assert len(sched.running) <= sched.config.max_num_seqs
    if out is not None:
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        for rid, n in out.num_scheduled_tokens.items():
            r = sched.requests[rid]
            assert 1 <= n <= sched.config.long_prefill_token_threshold
            # Exactly the blocks the scheduled tokens need, no more.
            assert len(kv.req_to_blocks[rid]) == cdiv(r.num_computed_tokens + n, BS)
    else:
        for r in sched.running:
            assert len(kv.req_to_blocks[r.request_id]) == cdiv(r.num_computed_tokens, BS)


def assert_all_free(sched: Scheduler) -> None:
    assert not sched.requests and not sched.running and not sched.waiting
    assert sched.kv.req_to_blocks == {}
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert all(b.ref_cnt == 0 for b in sched.kv.pool.blocks)


def reference_output(prompt, max_tokens, max_model_len, model=next_token, stop=(), min_tokens=0):
    tokens, out = list(prompt), []
    while True:
        t = model(tokens)
        tokens.append(t)
        out.append(t)
        if t in stop and len(out) >= min_tokens:
            return out, "stop"
        if (max_tokens is not None and len(out) >= max_tokens) or len(tokens) >= max_model_len:
            return out, "length"


def new_ids(out: SchedulerOutput):
    return {n.req_id: n.block_ids for n in out.scheduled_new_reqs}


def cached_diff(out: SchedulerOutput):
    c = out.scheduled_cached_reqs
    return {rid: (toks, blocks, comp) for rid, toks, blocks, comp in
            zip(c.req_ids, c.new_token_ids, c.new_block_ids, c.num_computed_tokens)}


# ---- exact scenarios ----------------------------------------------------------------


def test_two_requests_exact_block_ids_on_fresh_pool():
    sched = make_sched(num_blocks=10)
    d = Driver(sched)
    pa, pb = list(range(100, 106)), list(range(200, 209))  # 6 and 9 tokens
    d.add(make_req("A", pa, max_tokens=5), make_req("B", pb, max_tokens=5))

    out = d.step()  # prefill both: A needs cdiv(6,4)=2 blocks, B cdiv(9,4)=3
    assert out.num_scheduled_tokens == {"A": 6, "B": 9} and out.total_num_scheduled_tokens == 15
    assert new_ids(out) == {"A": [0, 1], "B": [2, 3, 4]}
    assert [n.num_computed_tokens for n in out.scheduled_new_reqs] == [0, 0]
    assert out.scheduled_cached_reqs.req_ids == [] and out.finished_req_ids == set()
    assert sched.kv.num_free_blocks == 5
    a1, b1 = next_token(pa), next_token(pb)
    assert d.outputs == {"A": [a1], "B": [b1]}

    out = d.step()  # decode: A 7 tokens (2 blocks), B 10 tokens (3 blocks): no new blocks
    assert out.num_scheduled_tokens == {"A": 1, "B": 1} and out.scheduled_new_reqs == []
    assert cached_diff(out) == {"A": ([a1], [], 6), "B": ([b1], [], 9)}
    out = d.step()  # A 8 tokens, B 11 tokens
    assert cached_diff(out) == {"A": ([d.outputs["A"][1]], [], 7),
                                "B": ([d.outputs["B"][1]], [], 10)}
    out = d.step()  # A 9 tokens -> 3rd block from the queue front: 5
    assert {k: v[1:] for k, v in cached_diff(out).items()} == {"A": ([5], 8), "B": ([], 11)}
    out = d.step()  # B 13 tokens -> 4th block: 6
    assert {k: v[1:] for k, v in cached_diff(out).items()} == {"A": ([], 9), "B": ([6], 12)}
    # (A held [0, 1, 5], B [2, 3, 4, 6]; FakeWorker checked its mirror against them each step)
    # max_tokens=5 reached after 5 steps: both finished and freed
    assert d.finish == {"A": "length", "B": "length"}
    assert d.outputs["A"] == reference_output(pa, 5, 64)[0]
    assert d.outputs["B"] == reference_output(pb, 5, 64)[0]
    assert_all_free(sched)
    assert d.step().finished_req_ids == {"A", "B"}


def test_chunked_prefill_splits_the_budget_by_hand():
    sched = make_sched(num_blocks=20, budget=10, threshold=8)
    d = Driver(sched)
    pa, pb = list(range(1, 21)), list(range(50, 57))  # 20 and 7 tokens
    d.add(make_req("A", pa, max_tokens=3), make_req("B", pb, max_tokens=3))

    out = d.step()  # A: min(20, 10, 8) = 8 -> 2 blocks; B: min(7, 2, 8) = 2 -> 1 block
    assert out.num_scheduled_tokens == {"A": 8, "B": 2}
    assert new_ids(out) == {"A": [0, 1], "B": [2]}
    assert d.outputs == {"A": [], "B": []}  # mid prefill: nothing sampled
    a, b = sched.requests["A"], sched.requests["B"]
    assert (a.num_computed_tokens, b.num_computed_tokens) == (8, 2)

    # A: min(12, 10, 8) = 8 -> 16 tokens = 4 blocks; B: min(5, 2) = 2 -> 4 tokens, 1 block
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 8, "B": 2}
    assert cached_diff(out) == {"A": ([], [3, 4], 8), "B": ([], [], 2)}
    assert d.outputs == {"A": [], "B": []}

    out = d.step()  # A: 4 left -> 20 tokens = 5 blocks; B: min(3, 6) = 3 -> 7 tokens = 2 blocks
    assert out.num_scheduled_tokens == {"A": 4, "B": 3} and out.total_num_scheduled_tokens == 7
    assert cached_diff(out) == {"A": ([], [5], 16), "B": ([], [6], 4)}
    assert len(d.outputs["A"]) == 1 and len(d.outputs["B"]) == 1  # both prompts done: sampled

    out = d.step()  # decode: A 21 tokens -> 6th block 7; B 8 tokens fits 2 blocks
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert {k: v[1:] for k, v in cached_diff(out).items()} == {"A": ([7], 20), "B": ([], 7)}
    d.run()
    assert d.outputs["A"] == reference_output(pa, 3, 64)[0]
    assert d.outputs["B"] == reference_output(pb, 3, 64)[0]


def test_decode_mixed_with_prefill_in_one_step():
    sched = make_sched(num_blocks=10, budget=8)
    d = Driver(sched)
    pa = [1, 2, 3]
    d.add(make_req("A", pa, max_tokens=4))
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 3} and new_ids(out) == {"A": [0]}

    pb = list(range(20, 33))  # 13 tokens
    d.add(make_req("B", pb, max_tokens=2))
    out = d.step()  # A decodes 1 (4 tokens: block 0); B gets the other 7 -> 2 blocks
    assert out.num_scheduled_tokens == {"A": 1, "B": 7}
    assert (new_ids(out) == {"B": [1, 2]} and cached_diff(out)
            == {"A": ([d.outputs["A"][0]], [], 3)})
    assert d.outputs["B"] == []

    out = d.step()  # A: 5 tokens -> block 3; B: last 6 -> 13 tokens = 4 blocks -> 4, 5
    assert out.num_scheduled_tokens == {"A": 1, "B": 6} and out.total_num_scheduled_tokens == 7
    assert {k: v[1:] for k, v in cached_diff(out).items()} == {"A": ([3], 4), "B": ([4, 5], 7)}
    assert len(d.outputs["B"]) == 1

    out = d.step()  # both decode
    assert out.num_scheduled_tokens == {"A": 1, "B": 1}
    assert d.finish == {"A": "length", "B": "length"}  # A: 4 tokens, B: 2 tokens
    assert_all_free(sched)
    assert d.outputs["A"] == reference_output(pa, 4, 64)[0]
    assert d.outputs["B"] == reference_output(pb, 2, 64)[0]


def test_preemption_of_newest_request_then_recompute_gives_same_tokens():
    pa, pb = list(range(100, 106)), list(range(200, 206))  # 6 tokens each, no shared blocks
    sched = make_sched(num_blocks=4, max_model_len=16)  # 16 token slots in all
    d = Driver(sched)
    d.add(make_req("A", pa, max_tokens=6), make_req("B", pb, max_tokens=6))

    out = d.step()
    assert new_ids(out) == {"A": [0, 1], "B": [2, 3]} and sched.kv.num_free_blocks == 0
    d.step()  # 8 tokens each, 7 computed
    d.step()  # 9 tokens each, 8 computed
    b = sched.requests["B"]
    assert b.num_tokens == 9 and b.num_output_tokens == 3
    b_hashes = list(b.block_hashes)
    assert sched.kv.pool.get_cached_block(b_hashes[0]).block_id == 2
    assert sched.kv.pool.get_cached_block(b_hashes[1]).block_id == 3

    # Step 4: A needs a 3rd block (9 tokens), none free -> B (newest) is preempted, its blocks
    # freed tail first ([3, 2]) and A takes block 3; nothing is admitted in this step.
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 1}
    assert cached_diff(out) == {"A": ([d.outputs["A"][2]], [3], 8)}
    assert out.scheduled_new_reqs == [] and out.finished_req_ids == {"B"}
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.num_preemptions == 1
    assert list(sched.waiting) == [b] and sched.running == [sched.requests["A"]]
    assert sched.kv.block_ids("B") == [] and sched.kv.block_ids("A") == [0, 1, 3]
    assert list(sched.kv.pool.free_queue) == [2]
    assert sched.kv.pool.get_cached_block(b_hashes[0]).block_id == 2  # still cached
    assert sched.kv.pool.get_cached_block(b_hashes[1]) is None  # evicted with block 3
    assert len(d.outputs["B"]) == 3

    # Step 5: B would hit block 2 (4 tokens) but needs 2 more + 1 revived = 3 > 1 free.
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 1} and b.status == RequestStatus.PREEMPTED
    # Step 6: A's 6th token: max_tokens -> A finishes and frees [3, 1, 0] after the free block 2.
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 1} and d.finish == {"A": "length"}
    assert list(sched.kv.pool.free_queue) == [2, 3, 1, 0]

    # Step 7: B resumes: hit on block 2 (tokens 0-3), recomputes tokens 4-8 (prompt + 3 outputs).
    out = d.step()
    assert out.num_scheduled_tokens == {"B": 5} and out.finished_req_ids == {"A"}
    (nb,) = out.scheduled_new_reqs
    assert nb.block_ids == [2, 3, 1] and nb.num_computed_tokens == 4
    assert nb.output_token_ids == d.outputs["B"][:3] and nb.prompt_token_ids == pb
    assert b.num_cached_tokens == 0  # the hit rate is recorded at the first schedule only
    d.run()
    assert d.finish == {"A": "length", "B": "length"}

    # Same tokens as an unconstrained run.
    ref = make_sched(num_blocks=20, max_model_len=16)
    rd = Driver(ref)
    rd.add(make_req("A", pa, max_tokens=6), make_req("B", pb, max_tokens=6))
    rd.run()
    assert ref.num_preemptions == 0
    assert d.outputs == rd.outputs
    assert d.outputs["B"] == reference_output(pb, 6, 16)[0]


def test_no_admission_in_a_step_that_preempted():
    # Chunking (threshold 4) makes the preempted request's re-admission need 1 block only,
    # which is free right after the preemption: it must still wait one step.
    # max_num_seqs=2 keeps C waiting behind them; the preempted B must go in front of C.
    sched = make_sched(num_blocks=4, budget=8, threshold=4, max_model_len=16, caching=False,
                       max_num_seqs=2)
    d = Driver(sched)
    d.add(make_req("A", [1, 2, 3, 4], max_tokens=12), make_req("B", [5, 6, 7, 8], max_tokens=12),
          make_req("C", [9, 9, 9, 9], max_tokens=2))
    out = d.step()
    assert new_ids(out) == {"A": [0], "B": [1]}
    out = d.step()  # 5 tokens each -> 2nd block
    assert {k: v[1] for k, v in cached_diff(out).items()} == {"A": [2], "B": [3]}
    for _ in range(3):
        d.step()  # 6, 7, 8 tokens: no new blocks
    b = sched.requests["B"]
    assert b.num_tokens == 9 and sched.kv.num_free_blocks == 0

    out = d.step()  # A needs a 3rd block: B preempted ([3, 1] freed), A takes 3, block 1 free
    assert out.num_scheduled_tokens == {"A": 1} and out.finished_req_ids == {"B"}
    assert cached_diff(out)["A"][1] == [3]
    assert list(sched.kv.pool.free_queue) == [1]
    assert [r.request_id for r in sched.waiting] == ["B", "C"]

    out = d.step()  # next step: B re-admitted with min(9, 8 - 1, 4) = 4 tokens -> block 1
    assert out.num_scheduled_tokens == {"A": 1, "B": 4}
    assert new_ids(out) == {"B": [1]}
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    d.run()
    rd = Driver(make_sched(num_blocks=20, budget=8, threshold=4, max_model_len=16, caching=False))
    rd.add(make_req("A", [1, 2, 3, 4], max_tokens=12), make_req("B", [5, 6, 7, 8], max_tokens=12),
           make_req("C", [9, 9, 9, 9], max_tokens=2))
    rd.run()
    assert d.outputs == rd.outputs
    assert d.finish == rd.finish == {"A": "length", "B": "length", "C": "length"}
    assert len(d.outputs["A"]) == 12  # 4 + 12 = 16 = max_model_len


def test_max_num_seqs_is_respected():
    sched = make_sched(num_blocks=10, max_num_seqs=2)
    d = Driver(sched)
    d.add(make_req("A", [1, 2, 3, 4], max_tokens=2), make_req("B", [5, 6, 7, 8], max_tokens=5),
          make_req("C", [9, 10, 11, 12], max_tokens=2))
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 4, "B": 4} and new_ids(out) == {"A": [0], "B": [1]}
    assert [r.request_id for r in sched.waiting] == ["C"]
    out = d.step()  # A, B decode into 5 tokens -> blocks 2, 3; A finishes (2 tokens)
    assert {k: v[1] for k, v in cached_diff(out).items()} == {"A": [2], "B": [3]}
    assert d.finish == {"A": "length"}
    out = d.step()  # C takes A's seat; A's blocks went to the back, so C gets block 4
    assert out.num_scheduled_tokens == {"B": 1, "C": 4} and new_ids(out) == {"C": [4]}
    d.run()
    assert d.finish == {"A": "length", "B": "length", "C": "length"}


def test_abort_frees_blocks():
    sched = make_sched(num_blocks=10, max_num_seqs=1)  # W stays waiting
    d = Driver(sched)
    d.add(make_req("A", range(9), max_tokens=10), make_req("W", [1, 2], max_tokens=10))
    out = d.step()
    assert new_ids(out) == {"A": [0, 1, 2]}
    sched.abort_requests(["A", "W", "unknown"])
    assert_all_free(sched)
    assert list(sched.kv.pool.free_queue) == [3, 4, 5, 6, 7, 8, 9, 2, 1, 0]
    out = sched.schedule()
    assert out.finished_req_ids == {"A", "W"} and out.is_empty


def test_abort_while_the_step_runs():
    sched = make_sched(num_blocks=10)
    d = Driver(sched)
    d.add(make_req("A", range(5), max_tokens=10), make_req("B", range(10, 15), max_tokens=1))
    out = sched.schedule()
    mro = d.worker.execute(out)
    sched.abort_requests(["A"])
    outs = sched.update_from_output(out, mro)
    assert [(o.request_id, o.finish_reason) for o in outs] == [("B", "length")]
    assert_all_free(sched)


def always_eos(tokens):
    return EOS


def test_eos_stops_only_after_min_tokens():
    sched = make_sched(num_blocks=10)
    d = Driver(sched, model=always_eos)
    d.add(make_req("M", [1, 2, 3], max_tokens=10, eos=EOS, min_tokens=3),
          make_req("Z", [4, 5, 6], max_tokens=10, eos=EOS),
          make_req("S", [7, 8, 9], max_tokens=10, min_tokens=2, stop_token_ids=[EOS]),
          make_req("I", [1, 1, 1], max_tokens=4))  # ignore_eos: EOS not in all_stop_token_ids
    d.run()
    assert d.outputs == {"M": [EOS] * 3, "Z": [EOS], "S": [EOS] * 2, "I": [EOS] * 4}
    assert d.finish == {"M": "stop", "Z": "stop", "S": "stop", "I": "length"}
    assert d.stop_reason == {"M": None, "Z": None, "S": EOS, "I": None}


def test_max_tokens_and_max_model_len_finish_with_length():
    sched = make_sched(num_blocks=10, max_model_len=8)
    d = Driver(sched)
    d.add(make_req("T", [1, 2], max_tokens=3), make_req("L", [3, 4, 5, 6, 7], max_tokens=None))
    d.run()
    assert len(d.outputs["T"]) == 3 and len(d.outputs["L"]) == 3  # 5 + 3 = 8 = max_model_len
    assert d.finish == {"T": "length", "L": "length"}
    assert d.outputs["L"] == reference_output([3, 4, 5, 6, 7], None, 8)[0]


def test_prefix_cache_hit_shares_block_ids():
    sched = make_sched(num_blocks=10)
    d = Driver(sched)
    pa = list(range(100, 110))  # 10 tokens: blocks 0, 1 full, 2 partial
    d.add(make_req("A", pa, max_tokens=4))
    out = d.step()
    assert new_ids(out) == {"A": [0, 1, 2]}
    assert d.num_cached == {"A": 0}

    pb = pa[:8] + [7, 7, 7]  # 11 tokens sharing A's 2 full blocks
    d.add(make_req("B", pb, max_tokens=4))
    out = d.step()  # B: hits 0, 1 (8 tokens); 3 left -> cdiv(11, 4) - 2 = 1 new block: 3
    assert out.num_scheduled_tokens == {"A": 1, "B": 3}
    (nb,) = out.scheduled_new_reqs
    assert nb.block_ids == [0, 1, 3] and nb.num_computed_tokens == 8
    assert sched.requests["B"].num_cached_tokens == 8 and d.num_cached["B"] == 8
    assert [blk.ref_cnt for blk in sched.kv.pool.blocks[:4]] == [2, 2, 1, 1]
    assert sched.kv.num_free_blocks == 6
    assert (sched.kv.prefix_queries, sched.kv.prefix_hits) == (10 + 11, 8)
    d.run()
    assert d.outputs["B"] == reference_output(pb, 4, 64)[0]

    # After both finished: a prompt of exactly A's 2 full blocks hits only the first one.
    d.add(make_req("C", pa[:8], max_tokens=1))
    out = d.step()
    (nc,) = out.scheduled_new_reqs
    assert (nc.num_computed_tokens == 4 and nc.block_ids[0] == 0 and out.num_scheduled_tokens
            == {"C": 4})
    assert d.num_cached["C"] == 4
    assert_all_free(sched)


def test_chunked_prefill_blocks_are_cached_before_the_prompt_finishes():
    sched = make_sched(num_blocks=20, budget=8, threshold=8)
    d = Driver(sched)
    pa = list(range(1, 21))  # 20 tokens: 8 per step
    d.add(make_req("A", pa, max_tokens=1))
    out = d.step()
    assert new_ids(out) == {"A": [0, 1]} and d.outputs["A"] == []
    d.add(make_req("B", pa[:8] + [99], max_tokens=1))
    out = d.step()  # A's first 2 blocks are computed and full: B hits them
    assert out.num_scheduled_tokens == {"A": 8}  # budget used up by A
    out = d.step()  # A: last 4 -> block 4; B: hits 0, 1, 1 token left -> block 5
    assert out.num_scheduled_tokens == {"A": 4, "B": 1}
    assert new_ids(out) == {"B": [0, 1, 5]} and d.num_cached["B"] == 8
    d.run()


def test_prefix_caching_disabled_recomputes_everything():
    sched = make_sched(num_blocks=10, caching=False)
    d = Driver(sched)
    d.add(make_req("A", range(9), max_tokens=2))
    d.step()
    d.add(make_req("B", range(9), max_tokens=2))
    out = d.step()
    assert out.num_scheduled_tokens == {"A": 1, "B": 9} and new_ids(out) == {"B": [3, 4, 5]}
    d.run()
    assert d.outputs["A"] == d.outputs["B"]


# ---- randomized stress -------------------------------------------------------------


def stress_model(tokens):
    return (sum(tokens) * 31 + len(tokens) * 7) % 23  # EOS (0) about 1 in 23


@pytest.mark.parametrize("seed,caching", [(0, True), (1, True), (2, False)])
def test_randomized_stress(seed, caching):
    rng = random.Random(seed)
    max_model_len = 40
    sched = make_sched(num_blocks=12, budget=16, threshold=8, max_num_seqs=4,
                       max_model_len=max_model_len, caching=caching)
    d = Driver(sched, model=stress_model)
    prefixes = [[rng.randrange(1, 30) for _ in range(12)] for _ in range(3)]
    expected, aborted, counter = {}, set(), 0
    for step in range(500):
        if rng.random() < 0.3:
            counter += 1
            rid = f"r{counter}"
            prompt = rng.choice(prefixes)[:rng.randrange(0, 13)] + \
                [rng.randrange(1, 30) for _ in range(rng.randrange(1, 18))]
            max_tokens = rng.randrange(1, 16)
            min_tokens = rng.randrange(0, max_tokens + 1)
            eos = EOS if rng.random() < 0.5 else None
            d.add(make_req(rid, prompt, max_tokens=max_tokens, eos=eos, min_tokens=min_tokens))
            expected[rid] = reference_output(prompt, max_tokens, max_model_len, stress_model,
                                             stop=(EOS,) if eos is not None else (),
                                             min_tokens=min_tokens)
        if sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(sched.requests))
            sched.abort_requests([victim])
            aborted.add(victim)
            check_invariants(sched)
        if sched.has_unfinished_requests():
            d.step()
    d.run(max_steps=2000)
    assert counter > 100 and sched.num_preemptions > 0
    if caching:
        assert sched.kv.prefix_hits > 0
    for rid, (tokens, reason) in expected.items():
        if rid in aborted:
            assert d.outputs[rid] == tokens[:len(d.outputs[rid])]
            continue
        assert d.outputs[rid] == tokens, rid
        assert d.finish[rid] == reason, rid
