"""NcclCommunicator: collectives on CUDA tensors through cupy's NCCL bindings.

Importing this module needs neither cupy nor a GPU; constructing the class checks both and
says which is missing. The NCCL unique id travels over the gloo world group (always
initialized: it also carries control messages), so no extra rendezvous is needed.
"""
from __future__ import annotations

import pickle
from typing import List, Sequence

import torch

from raylm.distributed.communicator import BaseCommunicator


def _require_cuda_and_cupy():
    """cupy's nccl module, or a RuntimeError naming what this machine lacks."""
    if not torch.cuda.is_available():
        raise RuntimeError("NcclCommunicator needs a CUDA GPU, and torch sees none on this "
                           "machine: use the gloo communicator (device 'cpu') here")
    try:
        from cupy.cuda import nccl
    except ImportError as exc:
        raise RuntimeError("NcclCommunicator needs cupy with NCCL (pip install cupy-cuda12x): "
                           f"cannot import it ({exc})") from exc
    return nccl


class NcclCommunicator(BaseCommunicator):
    def __init__(self, ranks: List[int], group) -> None:
        import torch.distributed as dist

        nccl = _require_cuda_and_cupy()
        me = dist.get_rank()
        if me not in ranks:
            raise ValueError(f"rank {me} is not in group {ranks}")
        uid = [nccl.get_unique_id() if ranks.index(me) == 0 else None]
        dist.broadcast_object_list(uid, src=ranks[0], group=group)
        self._connect(nccl, uid[0], ranks.index(me), len(ranks))
        self.ranks = list(ranks)

    @classmethod
    def over_store(cls, store, key: str, rank: int, size: int) -> "NcclCommunicator":
        """A communicator of `size` processes that share no torch.distributed world (the DP
        group across replicas): rank 0 publishes the NCCL unique id in `store` under `key`,
        the others wait for it there."""
        nccl = _require_cuda_and_cupy()
        if rank == 0:
            store.set(key, pickle.dumps(nccl.get_unique_id()))
        self = cls.__new__(cls)
        self._connect(nccl, pickle.loads(store.get(key)), rank, size)
        self.ranks = list(range(size))
        return self

    def _connect(self, nccl, unique_id, rank: int, size: int) -> None:
        self.nccl, self.rank, self.size = nccl, rank, size
        self.comm = nccl.NcclCommunicator(size, unique_id, rank)
        self._types = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
                       torch.bfloat16: nccl.NCCL_BFLOAT16, torch.int64: nccl.NCCL_INT64,
                       torch.int32: nccl.NCCL_INT32}

    def _stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def _type(self, x: torch.Tensor) -> int:
        if x.dtype not in self._types:
            raise ValueError(f"NCCL: unsupported dtype {x.dtype}")
        return self._types[x.dtype]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        self.comm.allReduce(x.data_ptr(), x.data_ptr(), x.numel(), self._type(x),
                            self.nccl.NCCL_SUM, self._stream())
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty((self.size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        self.comm.allGather(x.data_ptr(), out.data_ptr(), x.numel(), self._type(x), self._stream())
        return torch.cat(out.unbind(0), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self._check_splits(x, dim)
        parts = torch.stack(x.chunk(self.size, dim=dim)).contiguous()  # rank-major
        out = torch.empty_like(parts[0])
        self.comm.reduceScatter(parts.data_ptr(), out.data_ptr(), out.numel(), self._type(x),
                                self.nccl.NCCL_SUM, self._stream())
        return out

    def send(self, x: torch.Tensor, dst: int) -> None:
        x = x.contiguous()
        self.comm.send(x.data_ptr(), x.numel(), self._type(x), dst, self._stream())

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(tuple(shape), dtype=dtype, device="cuda")
        self.comm.recv(out.data_ptr(), out.numel(), self._type(out), src, self._stream())
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        x = x.contiguous()
        self.comm.broadcast(x.data_ptr(), x.data_ptr(), x.numel(), self._type(x), src,
                            self._stream())
        return x

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1, device="cuda"))
        torch.cuda.current_stream().synchronize()
