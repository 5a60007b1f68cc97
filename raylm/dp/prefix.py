"""Prefix-cache summaries: what an engine replica tells the routers about its prefix cache.

A KV block's identity is a chained hash of its tokens and everything before it
(`hash_block`, shared by the engine's prefix cache and the routers, so it lives here, below
both). A replica does not report every cached block: only those whose prefix is 1, 2 or 4
blocks long or a multiple of 8 (`is_summary_depth`), so a summary costs about one hash per
8 cached blocks, and a router learns the longest cached prefix of a prompt to within 8
blocks (128 tokens at block size 16). A hit at depth d means the replica held all d blocks
when it reported: the chain hash names the whole prefix, and eviction takes a sequence's
tail blocks first.
"""
from __future__ import annotations

from typing import AbstractSet, List, Optional, Sequence

SUMMARY_STRIDE = 8  # past the first few blocks, every 8th depth is reported


ROOT_HASH = 0x7261796C6D  # the parent of a sequence's first block


def hash_block(parent_hash: Optional[int], token_ids: Sequence[int]) -> int:
    """Chained block hash: a block's identity is its tokens *and* everything before it.

    Python's hash of a tuple of ints is the same in every process (PYTHONHASHSEED only salts
    str/bytes), which the routers rely on; hash(None) is not before Python 3.12 (it is the
    object's address), so a first block's parent is ROOT_HASH. 64-bit: at ~1e5 cached blocks
    a collision has odds ~1e-9.
    """
    return hash((ROOT_HASH if parent_hash is None else parent_hash, tuple(token_ids)))


def is_summary_depth(depth: int) -> bool:
    """Whether a cached block whose prefix is `depth` blocks long (itself included) is in
    its replica's summary."""
    return depth in (1, 2, 4) or (depth > 0 and depth % SUMMARY_STRIDE == 0)


def prefix_hashes(token_ids: Sequence[int], block_size: int) -> List[int]:
    """The chained hashes of every full block of `token_ids` (index i: depth i + 1)."""
    hashes: List[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None,
                                 token_ids[start:start + block_size]))
    return hashes


def cached_blocks(hashes: Sequence[int], summary: AbstractSet[int]) -> int:
    """How many leading blocks of a prompt (its `prefix_hashes`) a replica whose summary is
    `summary` holds, to the summary's resolution: the deepest summarized depth it has."""
    for depth in range(len(hashes), 0, -1):
        if is_summary_depth(depth) and hashes[depth - 1] in summary:
            return depth
    return 0
