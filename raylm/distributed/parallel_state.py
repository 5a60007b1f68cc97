"""Which tensor- and pipeline-parallel groups this process belongs to. Layers ask here for
rank/size and reduce through the group's communicator; a worker installs real groups
before it builds the model (`init_parallel_groups`), and the defaults are one rank each.

Global rank = pp_rank * tp_size + tp_rank: the TP ranks of a stage are contiguous.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)


class CommClock:
    """Seconds this process spent inside collectives and stage-to-stage transfers (waiting
    for a peer included) since the last `take()`; the model runner reports it per step."""

    seconds = 0.0

    @classmethod
    def take(cls) -> float:
        spent, cls.seconds = cls.seconds, 0.0
        return spent


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        CommClock.seconds += time.perf_counter() - start


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1
    communicator: Optional[object] = None  # a raylm.executor BaseCommunicator when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        return _timed(self.communicator.all_reduce, x)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        return _timed(self.communicator.all_gather, x, dim=dim)


@dataclass
class PPGroup:
    """This rank's pipeline stage. `communicator` covers this TP rank's column of stages
    (group rank = stage), so send/recv go to the same TP rank of the next/previous stage."""

    rank: int = 0
    size: int = 1
    communicator: Optional[object] = None
    layer_split: Optional[Tuple[int, ...]] = None  # layers per stage; None = as even as possible

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def layer_range(self, num_layers: int) -> Tuple[int, int]:
        """[start, end) of the decoder layers this stage runs."""
        counts = stage_layer_counts(num_layers, self.size, self.layer_split)
        start = sum(counts[:self.rank])
        return start, start + counts[self.rank]

    def send_next(self, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            _timed(self.communicator.send, t, self.rank + 1)

    def recv_prev(self, shape: Sequence[int], dtype: torch.dtype,
                  count: int) -> List[torch.Tensor]:
        return [_timed(self.communicator.recv, shape, dtype, self.rank - 1) for _ in range(count)]


@dataclass
class EPGroup:
    """Which experts this rank holds. Within a replica (`dp` None) the TP ranks hold whole
    experts instead of a slice of every expert; tokens are already replicated over the TP
    group, so a rank runs its own experts and the MoE layer's all-reduce sums the parts.
    Across DP replicas (`dp` set: rank = dp_rank * tp + tp_rank over dp * tp ranks) the
    replicas' tokens differ: each MoE layer all-gathers every replica's tokens (`dispatch`),
    runs its experts on all of them, and sums the contributions back to their owners
    (`combine`: an all-reduce, then this replica's rows; gloo has no reduce-scatter).
    `placement[e]` is the rank holding expert e (a table, so a rebalance can move experts);
    None places contiguous blocks."""

    rank: int = 0
    size: int = 1
    placement: Optional[Tuple[int, ...]] = None
    # a raylm.distributed.dp_group.DPGroup over this TP rank's replicas
    dp: Optional[object] = None
    counts: Tuple[int, ...] = ()  # tokens per DP rank in this step's forward (from begin_step)

    def local_experts(self, num_experts: int) -> List[int]:
        placement = self.placement or tuple(e * self.size // num_experts
                                            for e in range(num_experts))
        if len(placement) != num_experts or sorted(set(placement)) != list(range(self.size)):
            raise ValueError(f"expert_placement {list(placement)} must give each of the model's "
                             f"{num_experts} experts a rank in [0, {self.size}), every rank at "
                             "least one")
        return [e for e, r in enumerate(placement) if r == self.rank]

    def begin_step(self, num_tokens: int, unfinished: int) -> int:
        """The step's one exchange over the DP group, before the forward: every rank's token
        count (the MoE layers pad to the largest) and unfinished-work flag. Returns how many
        ranks have unfinished work; 0 means every rank skips this forward and the wave ends."""
        mine = torch.tensor([num_tokens, unfinished], dtype=torch.long)
        rows = _timed(self.dp.all_gather, mine)
        self.counts = tuple(int(r[0]) for r in rows)
        return sum(int(r[1]) for r in rows)

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """[n, H] local tokens -> [dp * max_n, H], every replica's tokens (zero-padded)."""
        pad = max(self.counts) - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        return torch.cat(_timed(self.dp.all_gather, x))

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """[dp * max_n, H] partial expert outputs -> [n, H]: summed over the group, our rows."""
        width = max(self.counts)
        total = _timed(self.dp.all_reduce, y)
        return total[self.dp.rank * width:self.dp.rank * width + self.counts[self.dp.rank]]


def stage_layer_counts(num_layers: int, num_stages: int,
                       split: Optional[Sequence[int]] = None) -> List[int]:
    """Layers per stage: `split` if given (must sum to num_layers, each >= 1), else an even
    split with the remainder on the earlier stages."""
    if split is not None:
        split = list(split)
        if len(split) != num_stages or sum(split) != num_layers or min(split) < 1:
            raise ValueError(f"pipeline layer split {split} must have {num_stages} entries >= 1 "
                             f"summing to num_hidden_layers ({num_layers})")
        return split
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} "
                         "layers")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


_TP = TPGroup()
_PP = PPGroup()
_EP = EPGroup()


def get_ep_group() -> EPGroup:
    return _EP


def set_ep_group(group: EPGroup) -> None:
    global _EP
    _EP = group


def get_tp_group() -> TPGroup:
    return _TP


def get_pp_group() -> PPGroup:
    return _PP


def set_tp_group(group: TPGroup) -> None:
    global _TP
    _TP = group


def set_pp_group(group: PPGroup) -> None:
    global _PP
    _PP = group


def init_expert_dp(tp_rank: int, tp_size: int, dp_rank: int, dp_size: int, store: Tuple[str, int],
                   prefix: str, my_host: str, placement: Optional[Sequence[int]] = None,
                   cuda: bool = False) -> EPGroup:
    """Join (or re-form, with a new `prefix`) expert parallelism across DP replicas: a DP
    group for this TP rank's column of replicas, EP rank dp_rank * tp + tp_rank."""
    from raylm.distributed.dp_group import DPGroup

    logger.info("joining DP group %s/tp%d at %s as rank %d of %d", prefix, tp_rank, store, dp_rank,
                dp_size)
    dp = DPGroup(store, f"{prefix}/tp{tp_rank}", dp_rank, dp_size, my_host, cuda)
    group = EPGroup(dp_rank * tp_size + tp_rank, dp_size * tp_size,
                    tuple(placement) if placement else None, dp)
    set_ep_group(group)
    return group


def init_parallel_groups(device: str, tp_size: int, pp_size: int,
                         layer_split: Optional[Sequence[int]] = None, cpu_kind: str = "gloo",
                         expert_parallel: bool = False,
                         expert_placement: Optional[Sequence[int]] = None) -> None:
    """Create this worker's TP and PP groups over the initialized torch.distributed world.
    Every rank creates every group, in the same order (torch.distributed's rule). TP groups
    use `cpu_kind` on CPU ("shm" or "gloo"); stage-to-stage transfers use gloo."""
    import torch.distributed as dist

    from raylm.distributed.communicator import create_communicator

    me = dist.get_rank()
    tp_rank, pp_rank = me % tp_size, me // tp_size
    split = tuple(layer_split) if layer_split else None
    for stage in range(pp_size):
        ranks = [stage * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if stage == pp_rank:
            comm = create_communicator(device, ranks, group, cpu_kind) if tp_size > 1 else None
            set_tp_group(TPGroup(tp_rank, tp_size, comm))
            if expert_parallel:
                set_ep_group(EPGroup(tp_rank, tp_size,
                                     tuple(expert_placement) if expert_placement else None))
    for t in range(tp_size):
        ranks = [s * tp_size + t for s in range(pp_size)]
        group = dist.new_group(ranks) if pp_size > 1 else None
        if t == tp_rank:
            comm = create_communicator(device, ranks, group) if pp_size > 1 else None
            set_pp_group(PPGroup(pp_rank, pp_size, comm, split))
