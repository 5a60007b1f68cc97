"""What crosses the scheduler -> executor boundary each step (cheap to pickle to workers)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from raylm.outputs import PositionLogprobs
from raylm.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (or dropped on preemption): sent in full."""

    req_id: str
    prompt_token_ids: List[int]
    output_token_ids: List[int]  # non-empty when resuming after preemption
    sampling_params: SamplingParams
    block_ids: List[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Diffs for requests the workers already hold, in parallel lists."""

    req_ids: List[str] = field(default_factory=list)
    new_token_ids: List[List[int]] = field(default_factory=list)  # tokens sampled since last sync
    new_block_ids: List[List[int]] = field(default_factory=list)
    num_computed_tokens: List[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: List[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: Dict[str, int]
    total_num_scheduled_tokens: int
    # Requests the workers should forget (finished, aborted or preempted since last step).
    finished_req_ids: Set[str] = field(default_factory=set)
    # Expert parallelism across DP replicas (lockstep): 1 if this engine has unfinished
    # requests. Workers exchange it over the DP group; an empty step is then a dummy forward.
    dp_unfinished: int = 0
    # structured outputs: one bitmask row (raylm.structured) per constrained request that
    # samples this step, in the order of grammar_req_ids
    grammar_req_ids: List[str] = field(default_factory=list)
    grammar_bitmask: Optional[Any] = None  # int32 tensor [len(grammar_req_ids), ceil(vocab / 32)]

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class ModelRunnerOutput:
    """Sampled tokens for requests whose scheduled tokens reached their end; a request in
    the middle of a chunked prefill maps to an empty list."""

    sampled_token_ids: Dict[str, List[int]]
    logprobs: Dict[str, List[PositionLogprobs]] = field(default_factory=dict)
    # seconds per phase on the worker that answered (prepare, forward, logits, sample, comm:
    # time in collectives and stage transfers, waits included); for `raylm bench`
    timings: Dict[str, float] = field(default_factory=dict)
    # lockstep: how many DP ranks had unfinished work at this step (0: the wave is over);
    # None when the engine does not run in lockstep
    dp_unfinished: Optional[int] = None
    # prompt_logprobs requests: the prompt positions this step computed, in order
    prompt_logprobs: Dict[str, List[PositionLogprobs]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    request_id: str
    new_token_ids: List[int]
    new_logprobs: Optional[List[PositionLogprobs]] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None
    num_cached_tokens: int = 0
    # every prompt token's after the first, with the request's first output (prompt_logprobs)
    prompt_logprobs: Optional[List[PositionLogprobs]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
