"""Which tensor-parallel group this process belongs to. Layers ask here for rank/size and
reduce through the group's communicator; the executor installs a real group per worker."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    communicator: Optional[object] = None  # a raylm.executor Communicator when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        return self.communicator.all_reduce(x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        return self.communicator.all_gather(x, dim=dim)


_TP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP


def set_tp_group(group: TPGroup) -> None:
    global _TP
    _TP = group
