"""Engine-side request state. The scheduler owns these; workers see only SchedulerOutput."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import List, Optional

from raylm.outputs import PositionLogprobs
from raylm.sampling_params import SamplingParams
from raylm.structured import BaseGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)  # identity: running/waiting membership must not compare token lists
class Request:
    request_id: str
    prompt_token_ids: List[int]
    sampling_params: SamplingParams
    eos_token_id: Optional[int] = None
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: List[int] = field(default_factory=list)
    # Tokens whose KV is in the cache. Always < num_tokens while running: the last token
    # (prompt end or latest sample) is the next step's input.
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit at first schedule; -1 until scheduled
    # How many of all_token_ids the workers already hold (SchedulerOutput sends the rest).
    num_synced_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: Optional[object] = None
    block_hashes: List[int] = field(default_factory=list)  # chained hashes of full blocks
    # prompt_logprobs requests: prompt tokens 1.. scored so far, sent with the first output
    prompt_logprobs: List[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs_sent: bool = False
    grammar: Optional[BaseGrammar] = None  # structured outputs: where the output is in its grammar

    def __post_init__(self) -> None:
        self.all_token_ids: List[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and some are still to compute: no prefix-cache hits."""
        return (self.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def finish_reason(self) -> Optional[str]:
        return self.status.value if self.status.finished else None
