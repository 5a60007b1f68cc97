"""POST /v1/completions: one engine request per prompt, n choices each (choice index =
prompt_index * n + sample index), streamed as SSE or returned whole."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from raylm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from raylm.serve.context import ServingContext, clamp_logprob, prompt_logprobs_field, usage
from raylm.serve.errors import sse_error_event, to_api_error
from raylm.serve.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                  CompletionResponse, CompletionStreamResponse)
from raylm.serve.streaming import (SSE_DONE, DeltaTracker, EventStreamResponse,
                                   merge_async_iterators, sse)


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
    out = CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs,
                             # all fields set: streamed chunks dump exclude_unset
                             top_logprobs=top_logprobs, text_offset=text_offset)
    return out, offset


def echo_logprobs(first_token: str, prompt_ids: Sequence[int],
                  positions: Sequence[Optional[PositionLogprobs]]) -> CompletionLogprobs:
    """The prompt's part of echo + logprobs: its first token has no logprob (None)."""
    rest, _ = completion_logprobs(prompt_ids[1:], positions[1:], len(first_token))
    return CompletionLogprobs(tokens=[first_token] + rest.tokens,
                              token_logprobs=[None] + rest.token_logprobs,
                              top_logprobs=[None] + rest.top_logprobs,
                              text_offset=[0] + rest.text_offset)


def _join(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


class _Prepared:
    """A validated completion request: prompts as token ids, their echo text, params."""

    def __init__(self, ctx: ServingContext, req: CompletionRequest) -> None:
        self.model = ctx.resolve_model(req.model)
        self.req = req
        prompts = req.prompts()
        self.prompt_ids = [ctx.encode(p) for p in prompts]
        self.params = [req.to_sampling_params(ctx.max_model_len, len(ids))
                       for ids in self.prompt_ids]
        self.echo_text = ([p if isinstance(p, str) else ctx.tokenizer.decode(p) for p in prompts]
                          if req.echo else [""] * len(prompts))
        self.echo_logprobs = req.echo and req.logprobs is not None
        self.first_tokens = [ctx.tokenizer.decode(ids[:1]) for ids in self.prompt_ids]
        self.request_id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.n = req.n

    def streams(self, ctx: ServingContext) -> AsyncIterator[Tuple[int, RequestOutput]]:
        iterators = [ctx.client.generate(ids, params, f"{self.request_id}-{i}")
                     for i, (ids, params) in enumerate(zip(self.prompt_ids, self.params))]
        return merge_async_iterators(iterators)

    def visible(self, text: str, token_ids: List[int], positions: Optional[List[PositionLogprobs]],
                finish_reason: Optional[str]):
        """What the response shows of a choice: scoring only (max_tokens 0) drops the token
        the engine had to sample."""
        if not self.req.scoring_only:
            return text, token_ids, positions, finish_reason
        return "", [], None if positions is None else [], finish_reason and "length"

    def logprobs(self, prompt_index: int, token_ids, positions, offset: int,
                 prompt_positions=None):
        """(logprobs of the sampled tokens from text `offset` on, with the prompt's first when
        `prompt_positions` are given and echo asked for them; the offset after them)."""
        if positions is None:
            return None, offset
        out, offset = completion_logprobs(token_ids, positions, offset)
        if prompt_positions is not None and self.echo_logprobs:
            out = _join(echo_logprobs(self.first_tokens[prompt_index],
                                      self.prompt_ids[prompt_index], prompt_positions), out)
        return out, offset

    def usage(self, finals: Sequence[Optional[RequestOutput]]):
        completion = sum(len(c.token_ids) for out in finals if out is not None
                         for c in out.outputs)
        completion = 0 if self.req.scoring_only else completion
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


def _choice(prep: _Prepared, prompt_index: int, final: RequestOutput,
            out: CompletionOutput) -> CompletionChoice:
    text, ids, positions, finish = prep.visible(out.text, out.token_ids, out.logprobs,
                                                out.finish_reason)
    choice = CompletionChoice(
        index=prompt_index * prep.n + out.index, text=prep.echo_text[prompt_index] + text,
        logprobs=prep.logprobs(prompt_index, ids, positions, len(prep.echo_text[prompt_index]),
                               final.prompt_logprobs)[0],
        finish_reason=finish, stop_reason=out.stop_reason if finish == out.finish_reason else None)
    if prep.req.prompt_logprobs is not None:
        choice.prompt_logprobs = prompt_logprobs_field(final.prompt_logprobs)
    return choice


def _response(prep: _Prepared, finals: List[Optional[RequestOutput]]) -> CompletionResponse:
    choices = [_choice(prep, i, out, c) for i, out in enumerate(finals) for c in out.outputs]
    return CompletionResponse(id=prep.request_id, model=prep.model, choices=choices,
                              usage=prep.usage(finals))


def _chunk(prep: _Prepared, choices: List[CompletionChoice], **extra: Any) -> str:
    chunk = CompletionStreamResponse(id=prep.request_id, object="text_completion",
                                     created=prep.created, model=prep.model, choices=choices,
                                     **extra)
    return sse(chunk.model_dump_json(exclude_unset=True))


def _delta_choice(prep: _Prepared, tracker: DeltaTracker, prompt_index: int, final: RequestOutput,
                  out: CompletionOutput) -> Optional[CompletionChoice]:
    key = (prompt_index, out.index)
    delta = tracker.delta(key, out)
    if delta is None:
        return None
    state = tracker.state(key)
    text, ids, positions, finish = prep.visible(delta.text, delta.token_ids, delta.logprobs,
                                                delta.finish_reason)
    if delta.first:
        text = prep.echo_text[prompt_index] + text
        state.extra["offset"] = len(prep.echo_text[prompt_index])
    # the prompt's logprobs go with the first delta (they come with the first sampled token)
    logprobs, state.extra["offset"] = prep.logprobs(prompt_index, ids, positions,
                                                    state.extra["offset"],
                                                    final.prompt_logprobs if delta.first else None)
    return CompletionChoice(index=prompt_index * prep.n + out.index, text=text, logprobs=logprobs,
                            finish_reason=finish,
                            stop_reason=delta.stop_reason if finish == delta.finish_reason
                            else None)


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
                choice = _delta_choice(prep, tracker, i, out, c)
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
