"""Turns EngineCoreOutputs into RequestOutputs: detokenize, stop strings, logprob text,
fan-in of the n samples of one request (children `{i}_{request_id}`), and the stream
interval (which steps' updates of a request are handed on at all)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from raylm.engine.detokenizer import IncrementalDetokenizer
from raylm.executor.sched_output import EngineCoreOutput
from raylm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from raylm.sampling_params import SamplingParams


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{index}_{request_id}"


@dataclass
class _Parent:
    output: RequestOutput
    unfinished: int
    children: List["_Child"] = field(default_factory=list)
    sent: bool = False  # an update of it has been handed on


@dataclass
class _Child:
    parent_id: str
    index: int
    detok: IncrementalDetokenizer
    params: SamplingParams
    completion: CompletionOutput = field(default=None)
    unsent: int = 0  # tokens since its request's last update was handed on


class OutputProcessor:
    """`stream_interval`: a request's update is handed on at its first step, when a sample
    finishes, and when one of its samples has that many tokens not handed on yet; between
    those its RequestOutput (cumulative) keeps growing unseen, so a consumer that takes
    deltas gets the tokens of the skipped steps together."""

    def __init__(self, tokenizer, stream_interval: int = 1) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.parents: Dict[str, _Parent] = {}
        self.children: Dict[str, _Child] = {}

    def add_request(self, request_id: str, prompt: Optional[str], prompt_ids: List[int],
                    params: SamplingParams, child_params: List[SamplingParams]) -> List[str]:
        """Register a request and its n children; returns the engine-level child ids."""
        completions = [CompletionOutput(i, "", [], 0.0 if params.logprobs is not None else None,
                                        [] if params.logprobs is not None else None)
                       for i in range(params.n)]
        self.parents[request_id] = _Parent(RequestOutput(request_id, prompt, prompt_ids,
                                                         completions), params.n)
        ids = []
        for i, cp in enumerate(child_params):
            cid = child_id(request_id, i, params.n)
            self.children[cid] = _Child(request_id, i,
                                        IncrementalDetokenizer(self.tokenizer, prompt_ids, cp), cp,
                                        completions[i])
            self.parents[request_id].children.append(self.children[cid])
            ids.append(cid)
        return ids

    def process(self, outputs: List[EngineCoreOutput]) -> Tuple[List[RequestOutput], List[str]]:
        """Returns the updated RequestOutputs and the child ids that hit a stop string
        (the engine must abort those: their tokens are done)."""
        updated: Dict[str, _Parent] = {}
        to_abort: List[str] = []
        for out in outputs:
            child = self.children.get(out.request_id)
            if child is None:
                continue
            finish, stop_reason = out.finish_reason, out.stop_reason
            if child.detok.update(out.new_token_ids) and finish is None:
                finish, stop_reason = "stop", child.detok.stop_reason
                to_abort.append(out.request_id)
            self._update_completion(child, out, finish, stop_reason)
            parent = self.parents[child.parent_id]
            if out.prompt_logprobs is not None and parent.output.prompt_logprobs is None:
                # every child scores the prompt (none may hit the cache): the first to finish
                # its prefill fills them in, before its own first token is seen
                parent.output.prompt_logprobs = [None] + [self._decoded(p)
                                                          for p in out.prompt_logprobs]
            parent.output.num_cached_tokens = out.num_cached_tokens
            child.unsent += len(out.new_token_ids)
            if finish is not None:
                self._finish_child(out.request_id, parent)
            if finish is not None or not parent.sent or child.unsent >= self.stream_interval:
                updated[child.parent_id] = parent
        for parent in updated.values():
            parent.sent = True
            for c in parent.children:
                c.unsent = 0
        return [parent.output for parent in updated.values()], to_abort

    def _update_completion(self, child: _Child, out: EngineCoreOutput, finish,
                           stop_reason) -> None:
        c = child.completion
        c.token_ids.extend(out.new_token_ids)
        c.text = child.detok.visible_text(finished=finish is not None)
        if out.new_logprobs and c.logprobs is not None:
            for token, position in zip(out.new_token_ids, out.new_logprobs):
                c.logprobs.append(self._decoded(position))
                c.cumulative_logprob += position[token].logprob
        if finish is not None:
            c.finish_reason, c.stop_reason = finish, stop_reason

    def _decoded(self, position: PositionLogprobs) -> PositionLogprobs:
        for tid, lp in position.items():
            lp.decoded_token = self.tokenizer.decode([tid])
        return position

    def _finish_child(self, cid: str, parent: _Parent) -> None:
        del self.children[cid]
        parent.unfinished -= 1
        if parent.unfinished == 0:
            parent.output.finished = True
            del self.parents[parent.output.request_id]

    def abort(self, request_id: str) -> List[str]:
        """Forget a request; returns its children's engine ids to abort."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        ids = [cid for cid, c in self.children.items() if c.parent_id == request_id]
        for cid in ids:
            completion = self.children[cid].completion
            completion.finish_reason = completion.finish_reason or "abort"
            del self.children[cid]
        parent.output.finished = True
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.parents)
