"""Decode steps as CUDA graphs: small decode batches are bound by kernel launches (a layer
is a dozen kernels), and replaying a captured graph launches them all at once.

Forwards are captured at bucketed batch sizes (`capture_sizes`) over static input buffers.
A live decode batch of n sequences is copied into the first n rows of the buffers, the rows
up to the next bucket are padding (token 0 at position 0, slot -1 so nothing is stored,
one context token read from block 0), and that bucket's graph is replayed; the first n
rows of its output are the batch's. Steps with a prefill, and batches above the largest
bucket, run eagerly. Without captured graphs `run` executes the same padded forward
eagerly, which is how the padding is tested on CPU.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from raylm.attention.triton_backend import TritonAttentionMetadata
from raylm.executor.input_batch import StepInputs

Forward = Callable[[torch.Tensor, torch.Tensor, TritonAttentionMetadata], torch.Tensor]


def capture_sizes(max_num_seqs: int) -> List[int]:
    """1, 2, 4, 8, then every 8 up to max_num_seqs (which is always the last)."""
    sizes = [s for s in [1, 2, 4] + list(range(8, max_num_seqs, 8)) if s < max_num_seqs]
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, device: torch.device, sizes: List[int], max_blocks: int) -> None:
        self.device, self.sizes, self.max_blocks = device, sorted(sizes), max_blocks
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        # one token each, always
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=device)
        self.graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> Optional[int]:
        return next((s for s in self.sizes if s >= n), None)

    def can_run(self, step: StepInputs) -> bool:
        meta = step.meta
        return (isinstance(meta, TritonAttentionMetadata) and meta.store_kv and not meta.prefills
                and self.bucket(meta.num_decodes) is not None
                and meta.block_table.shape[1] <= self.max_blocks)

    def run(self, step: StepInputs, forward: Forward) -> torch.Tensor:
        """The final hidden states of a decode-only step, rows in the step's order."""
        n = step.meta.num_decodes
        size = self.bucket(n)
        self._load(step, size)
        if size in self.graphs:
            graph, out = self.graphs[size]
            graph.replay()
            return out[:n]
        return forward(self.input_ids[:size], self.positions[:size], self._meta(size))[:n]

    def capture(self, forward: Forward) -> None:
        """Capture every size, largest first, into one memory pool. Each is run eagerly once
        first: Triton compiles its kernels outside the capture."""
        pool = None
        for size in reversed(self.sizes):
            self._pad(0, size)
            forward(self.input_ids[:size], self.positions[:size], self._meta(size))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = forward(self.input_ids[:size], self.positions[:size], self._meta(size))
            pool = graph.pool()
            self.graphs[size] = (graph, out)
        torch.cuda.synchronize(self.device)

    def _meta(self, size: int) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(self.slots[:size], num_decodes=size,
                                       cu_seqlens_q=self.cu_seqlens[:size + 1],
                                       seq_lens=self.seq_lens[:size],
                                       block_table=self.block_table[:size], max_query_len=1)

    def _load(self, step: StepInputs, size: int) -> None:
        meta, n = step.meta, step.meta.num_decodes
        self.input_ids[:n].copy_(step.input_ids, non_blocking=True)
        self.positions[:n].copy_(step.positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.block_table[:n, :meta.block_table.shape[1]].copy_(meta.block_table, non_blocking=True)
        self._pad(n, size)

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end-1: a harmless one-token sequence that stores nothing."""
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slots[start:end] = -1
        self.seq_lens[start:end] = 1
        self.block_table[start:end, 0] = 0
