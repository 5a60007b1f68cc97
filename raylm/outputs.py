"""vLLM-shaped results: RequestOutput holds one CompletionOutput per sample (n)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


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
    # prompt_logprobs requests: one entry per prompt token, None for the first (nothing
    # predicts it); None until the prefill is done
    prompt_logprobs: Optional[List[Optional[PositionLogprobs]]] = None


# ---- delta streaming ------------------------------------------------------------------
# A stream that asks for output_kind="delta" gets, per update, only what is new in each
# choice: the text and token ids (and logprobs) since the last update. Crossing a process
# boundary (Serve replica -> ingress) a delta costs O(new tokens) to pickle, where the
# cumulative form costs O(all tokens so far) every step.

@dataclass
class DeltaState:
    """What one delta stream has sent so far."""
    # choice -> (text chars, tokens)
    sent: Dict[int, Tuple[int, int]] = field(default_factory=dict)
    done: set = field(default_factory=set)  # choices whose finish was sent
    started: bool = False  # the prompt ids go out with the first delta only
    prompt_logprobs_sent: bool = False  # and the prompt logprobs with the first that has them


def delta_output(out: RequestOutput, state: DeltaState) -> Optional[RequestOutput]:
    """The part of cumulative `out` not yet sent (`state` is updated); None when nothing
    changed. Choices with nothing new are left out."""
    choices = []
    for c in out.outputs:
        chars, tokens = state.sent.get(c.index, (0, 0))
        if c.index in state.done or (len(c.token_ids) == tokens and len(c.text) == chars
                                     and not c.finish_reason):
            continue
        choices.append(CompletionOutput(
            c.index, c.text[chars:], c.token_ids[tokens:], c.cumulative_logprob,
            c.logprobs[tokens:] if c.logprobs is not None else None, c.finish_reason,
            c.stop_reason))
        state.sent[c.index] = (len(c.text), len(c.token_ids))
        if c.finish_reason:
            state.done.add(c.index)
    if not choices and not out.finished:
        return None
    prompt, prompt_ids = (None, []) if state.started else (out.prompt, out.prompt_token_ids)
    state.started = True
    prompt_logprobs = None if state.prompt_logprobs_sent else out.prompt_logprobs
    state.prompt_logprobs_sent = state.prompt_logprobs_sent or prompt_logprobs is not None
    return RequestOutput(out.request_id, prompt, prompt_ids, choices, out.finished,
                         out.num_cached_tokens, dict(out.metrics), prompt_logprobs)


def merge_delta(acc: Optional[RequestOutput], delta: RequestOutput) -> RequestOutput:
    """Fold a delta into the cumulative output `acc` (None for the first delta)."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, list(delta.prompt_token_ids), [])
    by_index = {c.index: c for c in acc.outputs}
    for d in delta.outputs:
        c = by_index.get(d.index)
        if c is None:
            c = by_index[d.index] = CompletionOutput(d.index, "", [], None,
                                                     [] if d.logprobs is not None else None)
            acc.outputs.append(c)
            acc.outputs.sort(key=lambda x: x.index)
        c.text += d.text
        c.token_ids.extend(d.token_ids)
        if d.logprobs is not None:
            c.logprobs.extend(d.logprobs)
        c.cumulative_logprob, c.finish_reason, c.stop_reason = (d.cumulative_logprob,
                                                                d.finish_reason, d.stop_reason)
    acc.finished, acc.num_cached_tokens, acc.metrics = (delta.finished, delta.num_cached_tokens,
                                                        delta.metrics)
    if delta.prompt_logprobs is not None:
        acc.prompt_logprobs = delta.prompt_logprobs
    return acc
