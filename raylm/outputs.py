"""vLLM-shaped results: RequestOutput holds one CompletionOutput per sample (n)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token under the raw model distribution
    decoded_token: Optional[str] = None


# One dict per generated position: token id -> Logprob (sampled token plus the top N).
PositionLogprobs = Dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: List[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[List[PositionLogprobs]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | None while running
    stop_reason: Optional[object] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)
