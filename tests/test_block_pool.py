"""BlockPool: ref counts, LRU free queue, prefix-cache index and eviction, with exact block ids."""
from __future__ import annotations

import pytest

from raylm.engine.block_pool import BlockPool, hash_block


def ids(blocks):
    return [b.block_id for b in blocks]


def free_order(pool: BlockPool):
    return list(pool.free_queue)


def test_fresh_pool_hands_out_lowest_ids_first():
    pool = BlockPool(6)
    assert pool.num_free_blocks == 6
    a = pool.get_new_blocks(2)
    assert ids(a) == [0, 1]
    assert [b.ref_cnt for b in a] == [1, 1]
    assert ids(pool.get_new_blocks(1)) == [2]
    assert free_order(pool) == [3, 4, 5]
    assert pool.num_free_blocks == 3


def test_asking_for_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    pool.get_new_blocks(2)
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(2)
    assert free_order(pool) == [2]


def test_freed_blocks_join_the_back_in_the_order_given():
    pool = BlockPool(6)
    a = pool.get_new_blocks(3)  # [0, 1, 2]
    pool.free_blocks(reversed(a))  # tail first, as KVCacheManager.free does
    assert free_order(pool) == [3, 4, 5, 2, 1, 0]
    assert [b.ref_cnt for b in a] == [0, 0, 0]
    # LRU: never-used blocks first, then the freed request's tail before its head.
    assert ids(pool.get_new_blocks(4)) == [3, 4, 5, 2]
    assert free_order(pool) == [1, 0]


def test_cached_free_block_survives_until_handed_out_then_is_evicted():
    pool = BlockPool(4)
    b0, b1 = pool.get_new_blocks(2)
    h0 = hash_block(None, [1, 2, 3, 4])
    h1 = hash_block(h0, [5, 6, 7, 8])
    pool.cache_block(b0, h0)
    pool.cache_block(b1, h1)
    assert (b0.block_hash, b1.block_hash) == (h0, h1)
    pool.free_blocks([b1, b0])
    assert free_order(pool) == [2, 3, 1, 0]
    # Free but still cached: a lookup finds them.
    assert pool.get_cached_block(h0) is b0 and pool.get_cached_block(h1) is b1
    assert pool.num_evictions == 0

    got = pool.get_new_blocks(3)
    assert ids(got) == [2, 3, 1]  # block 1 is the LRU cached block: evicted
    assert pool.get_cached_block(h1) is None
    assert b1.block_hash is None and b1.ref_cnt == 1
    assert pool.get_cached_block(h0) is b0 and b0.block_hash == h0
    assert pool.num_evictions == 1
    assert free_order(pool) == [0]

    # A hit on the free cached block revives it (leaves the free queue, ref 1) without eviction.
    pool.touch([b0])
    assert b0.ref_cnt == 1 and pool.num_free_blocks == 0
    assert pool.get_cached_block(h0) is b0
    pool.free_blocks([b0])
    assert free_order(pool) == [0] and pool.get_cached_block(h0) is b0


def test_shared_block_ref_counts():
    pool = BlockPool(4)
    b0, b1 = pool.get_new_blocks(2)
    pool.touch([b0])  # a second request shares block 0
    pool.touch([b0])  # and a third
    assert (b0.ref_cnt, b1.ref_cnt) == (3, 1)
    pool.free_blocks([b0])
    assert b0.ref_cnt == 2 and free_order(pool) == [2, 3]
    pool.free_blocks([b1, b0])
    assert (b0.ref_cnt, b1.ref_cnt) == (1, 0) and free_order(pool) == [2, 3, 1]
    pool.free_blocks([b0])
    assert b0.ref_cnt == 0 and free_order(pool) == [2, 3, 1, 0]


def test_double_free_asserts_and_leaves_state_intact():
    pool = BlockPool(3)
    (b,) = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free_blocks([b])
    assert b.ref_cnt == 0
    assert free_order(pool) == [1, 2, 0]
    assert ids(pool.get_new_blocks(3)) == [1, 2, 0]
    assert b.ref_cnt == 1


def test_chained_hash_depends_on_parent():
    tokens = [5, 6, 7, 8]
    root = hash_block(None, tokens)
    assert root == hash_block(None, (5, 6, 7, 8))  # deterministic, list or tuple
    parent_a = hash_block(None, [1, 1, 1, 1])
    parent_b = hash_block(None, [2, 2, 2, 2])
    under_a, under_b = hash_block(parent_a, tokens), hash_block(parent_b, tokens)
    assert len({root, under_a, under_b}) == 3
    assert hash_block(parent_a, tokens) == under_a
    assert hash_block(parent_a, [5, 6, 7, 9]) != under_a


def test_same_content_cached_twice_keeps_the_first():
    pool = BlockPool(4)
    b0, b1 = pool.get_new_blocks(2)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(b0, h)
    pool.cache_block(b1, h)
    assert pool.get_cached_block(h) is b0
    assert b1.block_hash is None
    # Re-registering a block that already has a hash changes nothing.
    pool.cache_block(b0, hash_block(None, [9, 9, 9, 9]))
    assert b0.block_hash == h and len(pool.cached) == 1


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (b,) = pool.get_new_blocks(1)
    h = hash_block(None, [1, 2])
    pool.cache_block(b, h)
    assert b.block_hash is None and pool.get_cached_block(h) is None


def test_reset_prefix_cache_only_when_all_free():
    pool = BlockPool(2)
    b0, b1 = pool.get_new_blocks(2)
    h = hash_block(None, [1])
    pool.cache_block(b0, h)
    pool.free_blocks([b0])
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(h) is b0
    pool.free_blocks([b1])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(h) is None and b0.block_hash is None
    assert pool.num_free_blocks == 2
