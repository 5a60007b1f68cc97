"""Gloo and shared-memory communicators between two real processes, against values
computed by hand."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from raylm.distributed.communicator import free_port


def _check(rank: int, port: int, kind: str) -> None:
    import torch.distributed as dist

    from raylm.distributed.communicator import create_communicator, init_world

    init_world("gloo", ("127.0.0.1", port), rank, 2)
    comm = create_communicator("cpu", [0, 1], dist.new_group([0, 1]), cpu_kind=kind)
    assert type(comm).__name__ == {"gloo": "GlooCommunicator", "shm": "ShmCommunicator"}[kind]
    assert (comm.rank, comm.size) == (rank, 2)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)  # rank 0: [1,2,3,4], rank 1: [2,4,6,8]
    assert comm.all_reduce(x.clone()).tolist() == [3.0, 6.0, 9.0, 12.0]
    assert comm.all_gather(x.view(2, 2), dim=-1).tolist() == [[1, 2, 2, 4], [3, 4, 6, 8]]
    assert comm.reduce_scatter(x.clone(), dim=0).tolist() == ([3.0, 6.0] if rank == 0
                                                              else [9.0, 12.0])
    assert comm.broadcast(x.clone(), src=1).tolist() == [2.0, 4.0, 6.0, 8.0]
    if rank == 0:
        comm.send(torch.arange(6, dtype=torch.float32).view(2, 3), dst=1)
    else:
        assert comm.recv((2, 3), torch.float32, src=0).tolist() == [[0, 1, 2], [3, 4, 5]]
    # many exchanges in a row: the double buffer must never hand out stale data
    for i in range(50):
        got = comm.all_reduce(torch.full((3,), float(i * 10 + rank)))
        assert got.tolist() == [float(i * 20 + 1)] * 3, (i, got)
    big = torch.ones(5 << 20) * (rank + 1)  # 20 MB: over a shared-memory slot, goes through gloo
    assert comm.all_reduce(big)[:2].tolist() == [3.0, 3.0]
    comm.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["gloo", "shm"])
def test_collectives_by_hand(kind):
    mp.spawn(_check, args=(free_port("127.0.0.1"), kind), nprocs=2, join=True)


def _check_nccl(rank: int, port: int, world: int) -> None:
    import torch.distributed as dist

    from raylm.distributed.communicator import create_communicator, init_world

    torch.cuda.set_device(rank)
    init_world("gloo", ("127.0.0.1", port), rank, world)  # gloo carries NCCL's unique id
    comm = create_communicator("cuda", list(range(world)), dist.new_group(list(range(world))))
    x = torch.arange(4, dtype=torch.float32, device="cuda") * (rank + 1)
    total = sum(range(1, world + 1))
    assert comm.all_reduce(x.clone()).tolist() == [float(i * total) for i in range(4)]
    gathered = comm.all_gather(x.view(1, 4), dim=0)
    assert gathered.tolist() == [[float(i * (r + 1)) for i in range(4)] for r in range(world)]
    assert comm.broadcast(x.clone(), src=0).tolist() == [0.0, 1.0, 2.0, 3.0]
    if world > 1:
        if rank == 0:
            comm.send(torch.ones(3, device="cuda"), dst=1)
        elif rank == 1:
            assert comm.recv((3,), torch.float32, src=0).tolist() == [1.0, 1.0, 1.0]
    comm.barrier()
    dist.destroy_process_group()


@pytest.mark.gpu
def test_nccl_collectives_by_hand():
    """One rank per visible GPU (NCCL does not share a GPU between ranks)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    pytest.importorskip("cupy")
    world = min(torch.cuda.device_count(), 2)
    mp.spawn(_check_nccl, args=(free_port("127.0.0.1"), world), nprocs=world, join=True)
