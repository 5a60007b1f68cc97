"""POST /v1/completions: one engine request per prompt, n choices each (choice index =
prompt_index * n + sample index), streamed as SSE or returned whole."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from raylm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from raylm.serve.context import ServingContext, clamp_logprob, usage
from raylm.serve.errors import sse_error_event, to_api_error
from raylm.serve.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                  CompletionStreamResponse)
from raylm.serve.streaming import SSE_DONE, DeltaTracker, EventStreamResponse, merge_async_iterators, sse


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
                        offset: int) -> Tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs (the chosen token plus the top N per position); returns them
    and the text offset after the last token."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, position in zip(token_ids, positions):
        chosen = position[token]
        text = chosen.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(clamp_logprob(chosen.logprob))
        ranked = sorted(position.values(), key=lambda lp: lp.rank)
        top_logprobs.append({lp.decoded_token or "": clamp_logprob(lp.logprob) for lp in ranked})
        text_offset.append(offset)
        offset += len(text)
    out = CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                             text_offset=text_offset)  # all fields set: streamed chunks dump exclude_unset
    return out, offset


class _Prepared:
    """A validated completion request: prompts as token ids, their echo text, params."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest) -> None:
        self.model = ctx.resolve_model(req.model)
        self.req = req
        prompts = req.prompts()
        self.prompt_ids = [ctx.encode(p) for p in prompts]
        self.params = [req.to_sampling_params(ctx.max_model_len, len(ids)) for ids in self.prompt_ids]
        self.echo_text = ([p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in prompts]
                          if req.echo else [""] * len(prompts))
        self.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = req.n

    def streams(self, ctx: ServingContext) -> AsyncIterator[Tuple[int, RequestOutput]]:
        iterators = [ctx.client.generate(ids, params, f"{self.request_id}-{i}")
                     for i, (ids, params) in enumerate(zip(self.prompt_ids, self.params))]
        return merge_async_iterators(iterators)

    def usage(self, finals: Sequence[Optional[RequestOutput]]):
        completion = sum(len(c.token_ids) for out in finals if out is not None for c in out.outputs)
        return usage(sum(len(ids) for ids in self.prompt_ids), completion)


async def create_completion(ctx: ServingContext, req: CompletionRequest):
    """The route's work: a CompletionResponse, or an EventStreamResponse when streaming."""
    prep = _Prepared(ctx, req)
    merged = prep.streams(ctx)
    if req.stream:
        first = await merged.__anext__()  # bad input raises here, before any header is sent
        return EventStreamResponse(_stream(prep, first, merged), upstream=merged)
    finals: List[Optional[RequestOutput]] = [None] * len(prep.prompt_ids)
    async for i, out in merged:
        finals[i] = out
    return _response(prep, finals)


def _choice(prep: _Prepared, prompt_index: int, out: CompletionOutput) -> CompletionChoice:
    echo = prep.echo_text[prompt_index]
    logprobs = None
    if out.logprobs is not None:
        logprobs, _ = completion_logprobs(out.token_ids, out.logprobs, len(echo))
    return CompletionChoice(index=prompt_index * prep.n + out.index, text=echo + out.text, logprobs=logprobs,
                            finish_reason=out.finish_reason, stop_reason=out.stop_reason)


def _response(prep: _Prepared, finals: List[Optional[RequestOutput]]) -> CompletionResponse:
    choices = [_choice(prep, i, c) for i, out in enumerate(finals) for c in out.outputs]
    return CompletionResponse(id=prep.request_id, model=prep.model, choices=choices, usage=prep.usage(finals))


def _chunk(prep: _Prepared, choices: List[CompletionChoice], **extra: Any) -> str:
    chunk = CompletionStreamResponse(id=prep.request_id, object="text_completion", created=prep.created,
                                     model=prep.model, choices=choices, **extra)
    return sse(chunk.model_dump_json(exclude_unset=True))


def _delta_choice(prep: _Prepared, tracker: DeltaTracker, prompt_index: int,
                  out: CompletionOutput) -> Optional[CompletionChoice]:
    key = (prompt_index, out.index)
    delta = tracker.delta(key, out)
    if delta is None:
        return None
    state = tracker.state(key)
    text = delta.text
    if delta.first:
        text = prep.echo_text[prompt_index] + text
        state.extra["offset"] = len(prep.echo_text[prompt_index])
    logprobs = None
    if delta.logprobs is not None:
        logprobs, state.extra["offset"] = completion_logprobs(delta.token_ids, delta.logprobs,
                                                              state.extra["offset"])
    return CompletionChoice(index=prompt_index * prep.n + out.index, text=text, logprobs=logprobs,
                            finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)


async def _stream(prep: _Prepared, first: Tuple[int, RequestOutput],
                  merged: AsyncIterator[Tuple[int, RequestOutput]]) -> AsyncIterator[str]:
    tracker = DeltaTracker()
    finals: List[Optional[RequestOutput]] = [None] * len(prep.prompt_ids)
    usage_field: Dict[str, Any] = {"usage": None} if prep.req.include_usage else {}
    try:
        item: Optional[Tuple[int, RequestOutput]] = first
        while item is not None:
            i, out = item
            finals[i] = out
            for c in out.outputs:
                choice = _delta_choice(prep, tracker, i, c)
                if choice is not None:
                    yield _chunk(prep, [choice], **usage_field)
            item = await anext(merged, None)
        if prep.req.include_usage:
            yield _chunk(prep, [], usage=prep.usage(finals))
    except Exception as exc:  # headers are out: report in-band, then end the stream
        yield sse_error_event(to_api_error(exc))
    finally:
        await merged.aclose()
    yield SSE_DONE
