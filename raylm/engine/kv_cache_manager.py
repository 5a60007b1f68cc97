"""Per-request block tables on top of the BlockPool: prefix lookup, allocation, caching,
freeing."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from raylm.engine.block_pool import Block, BlockPool, hash_block
from raylm.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Allocation is a `can_allocate` / `allocate` pair: the scheduler asks first, and
    `allocate` never fails after a yes. Invariant: when no request holds blocks,
    `num_free_blocks == num_blocks` (tests assert it after every run)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: Dict[str, List[Block]] = {}
        # leading blocks of a request already in the cache
        self.num_registered: Dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up / hit, for the prefix-cache hit rate
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> List[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> Tuple[List[Block], int]:
        """Longest run of cached full blocks matching the request's tokens. At least one
        token is always left to compute: the step needs logits for the last one."""
        if not self.pool.enable_caching:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: List[Block] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def _num_new_blocks(self, request: Request, num_new_tokens: int,
                        computed: Sequence[Block]) -> int:
        held = len(self.req_to_blocks.get(request.request_id, ())) + len(computed)
        num_computed = request.num_computed_tokens + len(computed) * self.block_size
        return max(0, cdiv(num_computed + num_new_tokens, self.block_size) - held)

    def can_allocate(self, request: Request, num_new_tokens: int,
                     computed: Sequence[Block] = ()) -> bool:
        revived = sum(1 for b in computed if b.ref_cnt == 0)  # hits sitting in the free queue
        return self._num_new_blocks(request, num_new_tokens,
                                    computed) + revived <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int,
                 computed: Sequence[Block] = ()) -> List[int]:
        """Give the request room for `num_new_tokens` more tokens; returns the new block ids
        (prefix hits first). Call only after `can_allocate` said yes."""
        num_new = self._num_new_blocks(request, num_new_tokens, computed)
        if self.pool.enable_caching and request.request_id not in self.req_to_blocks:
            # Count the lookup once, when the request is admitted: a waiting request is looked
            # up again every step it cannot be admitted, which would skew the hit rate.
            self.prefix_queries += request.num_tokens
            self.prefix_hits += len(computed) * self.block_size
        self.pool.touch(computed)
        new_blocks = list(computed) + self.pool.get_new_blocks(num_new)
        blocks = self.req_to_blocks.setdefault(request.request_id, [])
        if computed:
            self.num_registered[request.request_id] = len(blocks) + len(computed)
        blocks.extend(new_blocks)
        return [b.block_id for b in new_blocks]

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.pool.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self.num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], request.block_hashes[i], depth=i + 1)
        self.num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_registered.pop(request.request_id, None)
        self.pool.free_blocks(reversed(blocks))

    def _update_hashes(self, request: Request) -> None:
        """Extend the request's chained hashes over every full block of its tokens."""
        hashes, size, tokens = request.block_hashes, self.block_size, request.all_token_ids
        for i in range(len(hashes), len(tokens) // size):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * size:(i + 1) * size]))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
