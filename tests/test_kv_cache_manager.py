"""KVCacheManager: block tables, prefix lookup, allocation with revived hits, caching, freeing.
Block size 4 throughout; every expected block id is worked out by hand in the comments."""
from __future__ import annotations

from raylm.engine.block_pool import hash_block
from raylm.engine.kv_cache_manager import KVCacheManager
from raylm.engine.request import Request
from raylm.sampling_params import SamplingParams

BS = 4


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=100))


def run_prefill(kv: KVCacheManager, r: Request):
    """Admit r with whatever prefix hits exist, compute its whole prompt and register the
    blocks."""
    hits, num_hit = kv.get_computed_blocks(r)
    n = r.num_tokens - num_hit
    assert kv.can_allocate(r, n, hits)
    new_ids = kv.allocate(r, n, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_blocks(r)
    return new_ids


def free_order(kv):
    return list(kv.pool.free_queue)


def test_allocate_and_grow_exact_block_ids():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    r = req("r", range(100, 110))  # 10 tokens -> 3 blocks
    assert kv.can_allocate(r, 10)
    assert kv.allocate(r, 10) == [0, 1, 2]
    assert kv.block_ids("r") == [0, 1, 2] and kv.num_free_blocks == 7
    r.num_computed_tokens = 10
    r.append_output_token(7)  # 11 tokens: still fits in 3 blocks
    assert kv.allocate(r, 1) == []
    r.num_computed_tokens = 11
    r.append_output_token(7)  # 12 tokens: exactly 3 blocks
    assert kv.allocate(r, 1) == []
    r.num_computed_tokens = 12
    r.append_output_token(7)  # 13 tokens -> 4th block
    assert kv.allocate(r, 1) == [3]
    assert kv.block_ids("r") == [0, 1, 2, 3] and kv.num_free_blocks == 6
    assert abs(kv.usage - 0.4) < 1e-9
    kv.free(r)
    assert kv.num_free_blocks == 10 and kv.block_ids("r") == []
    assert free_order(kv) == [4, 5, 6, 7, 8, 9, 3, 2, 1, 0]  # tail first


def test_prefix_hit_never_covers_the_whole_prompt():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8])  # exactly 2 full blocks
    assert run_prefill(kv, a) == [0, 1]
    assert len(kv.pool.cached) == 2
    kv.free(a)  # queue: [2..9, 1, 0], both still cached

    b = req("b", [1, 2, 3, 4, 5, 6, 7, 8])
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0] and num_hit == 4  # last token must be computed
    c = req("c", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    hits_c, num_hit_c = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits_c] == [0, 1] and num_hit_c == 8
    d = req("d", [1, 2, 3, 4])
    assert kv.get_computed_blocks(d) == ([], 0)

    # b: 1 revived hit + cdiv(4 + 4, 4) - 1 = 1 new block from the front of the queue.
    assert kv.allocate(b, 4, hits) == [0, 2]
    assert free_order(kv) == [3, 4, 5, 6, 7, 8, 9, 1]
    assert kv.pool.get_cached_block(a.block_hashes[1]).block_id == 1  # still cached while free


def test_chained_hash_prevents_false_hit():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(kv, a)  # blocks 0, 1 cached (block 2 is partial)
    assert len(kv.pool.cached) == 2
    b = req("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])  # same 2nd block, different parent
    assert kv.get_computed_blocks(b) == ([], 0)
    assert b.block_hashes[1] != a.block_hashes[1]
    assert b.block_hashes[1] == hash_block(hash_block(None, [0, 0, 0, 0]), [5, 6, 7, 8])
    c = req("c", [1, 2, 3, 4, 0, 0, 0, 0, 9])  # same 1st block only
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and num_hit == 4


def test_can_allocate_counts_revived_free_hits():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = req("a", range(10, 22))  # 12 tokens
    assert run_prefill(kv, a) == [0, 1, 2]
    kv.free(a)
    assert free_order(kv) == [3, 2, 1, 0] and len(kv.pool.cached) == 3

    # 20 tokens, hits on blocks 0, 1 (free): needs 3 new + 2 revived = 5 > 4 free.
    c = req("c", list(range(10, 18)) + list(range(90, 102)))
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
    assert kv.can_allocate(c, 12, hits) is False

    # 16 tokens: 2 new + 2 revived = 4 <= 4.
    b = req("b", list(range(10, 18)) + list(range(90, 98)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
    assert kv.can_allocate(b, 8, hits) is True
    h2 = a.block_hashes[2]
    assert kv.pool.get_cached_block(h2).block_id == 2
    assert kv.allocate(b, 8, hits) == [0, 1, 3, 2]  # hits first, then new from the queue front
    assert kv.num_free_blocks == 0
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [1, 1, 1, 1]
    assert kv.pool.get_cached_block(h2) is None and kv.pool.num_evictions == 1
    b.num_computed_tokens = 16
    kv.free(b)
    assert kv.num_free_blocks == 4 and free_order(kv) == [2, 3, 1, 0]


def test_hits_held_by_a_running_request_are_shared_not_revived():
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    a = req("a", range(10, 22))
    assert run_prefill(kv, a) == [0, 1, 2]  # a keeps running; free: [3, 4]
    c = req("c", list(range(10, 18)) + [50, 51, 52, 53])  # 12 tokens, hits 0, 1 (held by a)
    hits, num_hit = kv.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0, 1] and num_hit == 8
    d = req("d", list(range(10, 18)) + list(range(60, 68)))  # 16 tokens: 2 new, 0 revived
    d_hits, _ = kv.get_computed_blocks(d)
    assert kv.can_allocate(d, 8, d_hits) is True
    e = req("e", list(range(10, 18)) + list(range(60, 69)))  # 17 tokens: 3 new > 2 free
    e_hits, _ = kv.get_computed_blocks(e)
    assert kv.can_allocate(e, 9, e_hits) is False

    assert kv.allocate(c, 4, hits) == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [2, 2, 1, 1, 0]
    assert kv.num_free_blocks == 1
    kv.free(a)
    assert [blk.ref_cnt for blk in kv.pool.blocks] == [1, 1, 0, 1, 0]
    assert free_order(kv) == [4, 2]
    kv.free(c)
    assert free_order(kv) == [4, 2, 3, 1, 0] and kv.num_free_blocks == 5


def test_cache_blocks_registers_only_full_computed_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = req("r", range(30, 40))  # 10 tokens
    assert kv.allocate(r, 10) == [0, 1, 2]
    r.num_computed_tokens = 6  # one full block computed
    kv.cache_blocks(r)
    blocks = kv.pool.blocks
    assert blocks[0].block_hash == r.block_hashes[0] == hash_block(None, [30, 31, 32, 33])
    assert blocks[1].block_hash is None and len(kv.pool.cached) == 1
    r.num_computed_tokens = 10
    kv.cache_blocks(r)
    assert blocks[1].block_hash == hash_block(r.block_hashes[0], [34, 35, 36, 37])
    assert blocks[2].block_hash is None and len(kv.pool.cached) == 2
    r.append_output_token(40)
    r.append_output_token(41)  # 12 tokens
    assert kv.allocate(r, 2) == []
    r.num_computed_tokens = 12
    kv.cache_blocks(r)
    assert blocks[2].block_hash == hash_block(r.block_hashes[1], [38, 39, 40, 41])
    assert len(kv.pool.cached) == 3
    kv.free(r)
    assert kv.num_free_blocks == 8 and kv.req_to_blocks == {} and kv.num_registered == {}
    assert free_order(kv) == [3, 4, 5, 6, 7, 2, 1, 0]


def test_caching_disabled_never_hits():
    kv = KVCacheManager(num_blocks=6, block_size=BS, enable_caching=False)
    a = req("a", range(9))
    assert run_prefill(kv, a) == [0, 1, 2]
    assert kv.pool.cached == {}
    b = req("b", range(9))
    assert kv.get_computed_blocks(b) == ([], 0)
    kv.free(a)
    assert kv.num_free_blocks == 6
    assert (kv.prefix_queries, kv.prefix_hits) == (0, 0)


def test_prefix_stats_counted_once_per_admission():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", range(8))
    run_prefill(kv, a)
    assert (kv.prefix_queries, kv.prefix_hits) == (8, 0)
    kv.free(a)
    b = req("b", list(range(8)) + [99])
    # A blocked waiting head is looked up again every step: only the admission counts.
    kv.get_computed_blocks(b)
    kv.get_computed_blocks(b)
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 8
    kv.allocate(b, 1, hits)
    assert (kv.prefix_queries, kv.prefix_hits) == (17, 8)
    b.num_computed_tokens = 9
    b.append_output_token(5)
    kv.allocate(b, 1)  # growth of a running request is not a lookup
    assert (kv.prefix_queries, kv.prefix_hits) == (17, 8)
