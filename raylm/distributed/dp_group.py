"""DPGroup: collectives across data-parallel replicas, for expert parallelism over DP.

One group per TP rank index: the workers with that TP rank in every replica. It is a
standalone gloo process group (not a subgroup of the replica's torch.distributed world,
which covers only the replica's own workers), rendezvoused through the TCP store that the
DP coordinator hosts, under a key prefix per generation. Elastic scaling re-forms it by
building a new one under the next generation's prefix; the replica's world is untouched.
On CUDA the same group also gets an NCCL communicator (its unique id travels through the
same store): CUDA tensors (the MoE tokens) go over NCCL, CPU ones (the lockstep counts) over
gloo.
"""
from __future__ import annotations

import datetime
from typing import List, Tuple

import torch
import torch.distributed as dist

from raylm.distributed.communicator import COLLECTIVE_TIMEOUT_S, _bind_gloo_to


class DPGroup:
    def __init__(self, store: Tuple[str, int], prefix: str, rank: int, size: int, my_host: str,
                 cuda: bool = False) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"DP rank {rank} is outside a group of {size}")
        _bind_gloo_to(my_host)
        timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        client = dist.TCPStore(store[0], store[1], is_master=False, timeout=timeout)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, client), rank, size, timeout)
        self.rank, self.size, self.prefix = rank, size, prefix
        self.nccl = None
        if cuda:
            from raylm.distributed.nccl_communicator import NcclCommunicator

            self.nccl = NcclCommunicator.over_store(client, f"{prefix}/nccl-unique-id", rank, size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In-place elementwise sum over the group."""
        if x.is_cuda:
            return self.nccl.all_reduce(x)
        x = x.contiguous()
        self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's x (same shape everywhere), in rank order."""
        if x.is_cuda:
            return list(self.nccl.all_gather(x.unsqueeze(0), dim=0).unbind(0))
        x = x.contiguous()
        parts = [[torch.empty_like(x) for _ in range(self.size)]]
        self.pg.allgather(parts, [x]).wait()
        return parts[0]
