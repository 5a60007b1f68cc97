"""Physical KV blocks: reference counts, the free queue (LRU), the prefix-cache index and
its summary for routers (raylm.dp.prefix)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

from raylm.dp.prefix import hash_block, is_summary_depth

__all__ = ["Block", "BlockPool", "hash_block"]


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[int] = None  # set once the block is full and registered in the cache


class BlockPool:
    """Owns every block. Free blocks sit in `free_queue` oldest-first; a free block may still
    hold cached KV (its hash stays in `cached`) until it is handed out again (evicted)."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: "OrderedDict[int, None]" = OrderedDict((i, None)
                                                                for i in range(num_blocks))
        self.cached: Dict[int, Block] = {}
        self.num_evictions = 0
        self._summary: Set[int] = set()  # cached hashes at summary depths (what routers see)
        self.summary_version = 0  # bumped whenever _summary changes

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def get_cached_block(self, block_hash: int) -> Optional[Block]:
        return self.cached.get(block_hash)

    def get_new_blocks(self, n: int) -> List[Block]:
        """Take n blocks from the LRU end of the free queue, evicting their cached KV."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free_queue)} free (call "
                               "can_allocate first)")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-cache hits (reviving them if they were free)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[Block]) -> None:
        """Drop a reference; blocks reaching zero join the free queue in the order given
        (callers pass a request's blocks tail-first, so its tail is evicted first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"block {block.block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = None

    def cache_block(self, block: Block, block_hash: int, depth: int = 0) -> None:
        """Register `block` under `block_hash`; `depth` is the length in blocks of the prefix
        it ends (0: unknown, never summarized)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        # same content computed twice (concurrent misses): keep the first
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        if is_summary_depth(depth):
            self._summary.add(block_hash)
            self.summary_version += 1

    def prefix_summary(self, known_version: int = -1) -> Tuple[int, Optional[FrozenSet[int]]]:
        """(version, hashes): the cached blocks at summary depths; hashes None when the
        version is still `known_version` (no copy made). Safe to call from another thread
        than the engine's: frozenset() copies a set without releasing the GIL."""
        version = self.summary_version
        return version, None if version == known_version else frozenset(self._summary)

    def _evict(self, block: Block) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                if block.block_hash in self._summary:
                    self._summary.discard(block.block_hash)
                    self.summary_version += 1
            block.block_hash = None
            self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only possible when no block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        self._summary.clear()
        self.summary_version += 1
        return True
