"""Collectives between the workers of one engine replica.

`BaseCommunicator` is what the TP/PP layers call; `create_communicator` picks gloo
(torch.distributed, CPU tensors) or NCCL (cupy, CUDA tensors). A communicator covers one
group of global ranks; `send`/`recv` name peers by their index in that group.

Rendezvous: the executor asks worker 0 for `rendezvous_address()` (its node's IP and a port
free there at that moment) and hands that to every worker; nothing assumes localhost or
a fixed port (Ray nodes here have addresses like 127.0.0.2).
"""
from __future__ import annotations

import datetime
import socket
from abc import ABC, abstractmethod
from typing import List, Sequence, Tuple

import torch

from raylm.config import gloo_socket_ifname

# A collective that waits longer than this has lost a peer: fail instead of hanging.
COLLECTIVE_TIMEOUT_S = 60


class BaseCommunicator(ABC):
    """Collectives over one group of ranks; `rank`/`size` are positions within the group."""

    rank: int
    size: int

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over the group; returns the result (may reuse x's storage)."""

    @abstractmethod
    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""

    @abstractmethod
    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then this rank's 1/size slice along `dim`."""

    def _check_splits(self, x: torch.Tensor, dim: int) -> None:
        """reduce_scatter's precondition: `dim` splits evenly over the group."""
        if x.shape[dim] % self.size:
            raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split over {self.size} "
                             "ranks")

    @abstractmethod
    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send x to group rank `dst` (blocks until handed off)."""

    @abstractmethod
    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int) -> torch.Tensor:
        """Receive a tensor of `shape`/`dtype` from group rank `src`."""

    @abstractmethod
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x from group rank `src` on every rank."""

    @abstractmethod
    def barrier(self) -> None:
        """Return once every rank of the group got here."""


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_world(backend: str, address: Tuple[str, int], rank: int, world_size: int) -> None:
    """Join the replica's process group (one per worker process), or check the one we are in."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world_size:
            raise RuntimeError(f"this process is already rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}")
        return
    host, port = address
    _bind_gloo_to(host)
    dist.init_process_group(backend=backend, init_method=f"tcp://{host}:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def _bind_gloo_to(host: str) -> None:
    """Make gloo use the interface that carries `host` (the Ray node IP), not whatever the
    hostname resolves to, unless the operator chose one with GLOO_SOCKET_IFNAME."""
    import os

    import psutil

    if gloo_socket_ifname() is not None:
        return
    if host.startswith("127."):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.0/8 all lives on loopback
        return
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == host for a in addrs):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def create_communicator(device: str, ranks: List[int], group=None,
                        cpu_kind: str = "gloo") -> BaseCommunicator:
    """A communicator over global `ranks` for tensors on `device` ('cpu' or 'cuda'). On CPU,
    `cpu_kind="shm"` uses shared memory when every rank is on this host (x86), else gloo."""
    if device == "cpu":
        from raylm.distributed.gloo_communicator import GlooCommunicator

        if cpu_kind == "shm" and _same_host_x86(group):
            from raylm.distributed.shm_communicator import ShmCommunicator

            return ShmCommunicator(ranks, group)
        return GlooCommunicator(ranks, group)
    if device == "cuda":
        from raylm.distributed.nccl_communicator import NcclCommunicator

        return NcclCommunicator(ranks, group)
    raise ValueError(f"no communicator for device {device!r} (use 'cpu' or 'cuda')")


def _same_host_x86(group) -> bool:
    """Every rank of `group` on this host, and x86 (the shm protocol relies on its store order).
    A collective: every rank must call it."""
    import platform

    import torch.distributed as dist

    hosts = [None] * dist.get_world_size(group)
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return len(set(hosts)) == 1 and platform.machine().lower() in ("x86_64", "amd64")
