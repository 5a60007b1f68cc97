"""GlooCommunicator: collectives on CPU tensors through torch.distributed's gloo backend."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.distributed as dist

from raylm.distributed.communicator import BaseCommunicator


class GlooCommunicator(BaseCommunicator):
    """Covers global `ranks` of the initialized world. `group` is the torch.distributed group
    for exactly those ranks (made by the caller: every rank must create every group, in the
    same order, so group creation belongs to whoever sees the whole grid)."""

    def __init__(self, ranks: List[int], group) -> None:
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"rank {me} is not in group {ranks}")
        self.ranks, self.group = list(ranks), group
        self.rank, self.size = self.ranks.index(me), len(ranks)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        # gloo has no reduce_scatter: all-reduce, then keep this rank's slice
        self._check_splits(x, dim)
        total = self.all_reduce(x.clone())
        return total.chunk(self.size, dim=dim)[self.rank].contiguous()

    def send(self, x: torch.Tensor, dst: int) -> None:
        dist.send(x.contiguous(), dst=self.ranks[dst])

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype)
        dist.recv(out, src=self.ranks[src])
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        x = x.contiguous()
        dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x

    def barrier(self) -> None:
        dist.barrier(group=self.group)
