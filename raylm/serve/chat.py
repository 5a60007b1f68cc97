"""POST /v1/chat/completions: messages through the tokenizer's chat template, one engine
request with n choices, streamed as SSE chunks or returned whole."""
from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from raylm.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from raylm.serve.context import ServingContext, clamp_logprob, prompt_logprobs_field, usage
from raylm.serve.errors import sse_error_event, to_api_error
from raylm.serve.protocol import (ChatCompletionChoice, ChatCompletionRequest,
                                  ChatCompletionResponse, ChatCompletionStreamChoice,
                                  ChatCompletionStreamResponse, ChatLogprobs, ChatLogprobToken,
                                  ChatResponseMessage, ChatTopLogprob, DeltaMessage, DeltaToolCall,
                                  FunctionCall, ToolCall)
from raylm.serve.streaming import SSE_DONE, DeltaTracker, EventStreamResponse, sse
from raylm.serve.tool_parsers import ParsedCall
from raylm.serve.tools import ToolStream, call_id


def chat_logprobs(token_ids: Sequence[int], positions: Sequence[PositionLogprobs],
                  top_n: int) -> ChatLogprobs:
    """OpenAI chat logprobs: per token its logprob, UTF-8 bytes and the top `top_n`
    alternatives."""
    content = []
    for token, position in zip(token_ids, positions):
        chosen = position[token]
        top = sorted(position.values(), key=lambda lp: lp.rank)[:top_n]
        content.append(ChatLogprobToken(
            token=chosen.decoded_token or "", logprob=clamp_logprob(chosen.logprob),
            bytes=list((chosen.decoded_token or "").encode("utf-8")),
            top_logprobs=[ChatTopLogprob(token=lp.decoded_token or "",
                                         logprob=clamp_logprob(lp.logprob),
                                         bytes=list((lp.decoded_token or "").encode("utf-8")))
                          for lp in top]))
    return ChatLogprobs(content=content)


class _Prepared:
    def __init__(self, ctx: ServingContext, req: ChatCompletionRequest) -> None:
        self.model = ctx.resolve_model(req.model)
        self.req = req
        self.plan = req.tool_plan()
        self.parser = ctx.tool_parser
        self.prompt_ids = ctx.apply_chat_template(req.conversation(), req.add_generation_prompt,
                                                  req.chat_template_kwargs,
                                                  self.plan.template_tools())
        self.params = req.to_sampling_params(ctx.max_model_len, len(self.prompt_ids))
        self.top_n = req.top_logprobs or 0
        self.request_id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self, final: Optional[RequestOutput]):
        completion = sum(len(c.token_ids) for c in final.outputs) if final is not None else 0
        return usage(len(self.prompt_ids), completion)

    def logprobs(self, token_ids, positions) -> Optional[ChatLogprobs]:
        return None if positions is None else chat_logprobs(token_ids, positions, self.top_n)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest):
    """The route's work: a ChatCompletionResponse, or an EventStreamResponse when streaming."""
    prep = _Prepared(ctx, req)
    outputs = ctx.client.generate(prep.prompt_ids, prep.params, prep.request_id)
    if req.stream:
        first = await outputs.__anext__()  # bad input raises here, before any header is sent
        return EventStreamResponse(_stream(prep, first, outputs), upstream=outputs)
    final = None
    try:
        async for final in outputs:
            pass
    finally:
        await outputs.aclose()
    return _response(prep, final)


def _finish_reason(prep: _Prepared, reason: Optional[str], made_calls: bool) -> Optional[str]:
    """"tool_calls" when the model chose to call (auto, required); a forced named function
    ends with "stop", as OpenAI's does."""
    chose = made_calls and prep.plan.mode in ("auto", "required")
    return "tool_calls" if chose and reason == "stop" else reason


def _tool_calls(calls: Sequence[ParsedCall]) -> List[ToolCall]:
    return [ToolCall(id=call_id(), function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls]


def _message(prep: _Prepared, text: str) -> ChatResponseMessage:
    if prep.plan.mode == "none":
        return ChatResponseMessage(content=text)
    content, calls = prep.plan.calls(text, prep.parser)
    return ChatResponseMessage(content=content, tool_calls=_tool_calls(calls))


def _response(prep: _Prepared, final: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for c in final.outputs:
        message = _message(prep, c.text)
        finish = _finish_reason(prep, c.finish_reason, bool(message.tool_calls))
        choices.append(ChatCompletionChoice(index=c.index, message=message, finish_reason=finish,
                                            logprobs=prep.logprobs(c.token_ids, c.logprobs),
                                            stop_reason=c.stop_reason))
    response = ChatCompletionResponse(id=prep.request_id, model=prep.model, choices=choices,
                                      usage=prep.usage(final))
    if prep.req.prompt_logprobs is not None:
        response.prompt_logprobs = prompt_logprobs_field(final.prompt_logprobs)
    return response


def _chunk(prep: _Prepared, choices: List[ChatCompletionStreamChoice], **extra: Any) -> str:
    chunk = ChatCompletionStreamResponse(id=prep.request_id, object="chat.completion.chunk",
                                         created=prep.created, model=prep.model, choices=choices,
                                         **extra)
    return sse(chunk.model_dump_json(exclude_unset=True))


def _delta_choice(prep: _Prepared, tracker: DeltaTracker,
                  out: CompletionOutput) -> Optional[ChatCompletionStreamChoice]:
    delta = tracker.delta(out.index, out)
    if delta is None:
        return None
    state = tracker.state(out.index)
    tools = state.extra.setdefault("tools", ToolStream(prep.plan, prep.parser))
    text, calls = tools.feed(delta.text, finished=delta.finish_reason is not None)
    message = DeltaMessage(content=text) if text else DeltaMessage()
    if calls:
        message.tool_calls = [DeltaToolCall(index=tools.num_calls + i, id=call_id(),
                                            type="function",
                                            function=FunctionCall(name=c.name,
                                                                  arguments=c.arguments))
                              for i, c in enumerate(calls)]
        tools.num_calls += len(calls)
    logprobs = prep.logprobs(delta.token_ids, delta.logprobs)
    if not (text or calls or logprobs or delta.finish_reason):
        return None  # held back (a tag's start, or a constrained call still growing)
    return ChatCompletionStreamChoice(index=out.index, delta=message, logprobs=logprobs,
                                      finish_reason=_finish_reason(prep, delta.finish_reason,
                                                                   tools.num_calls > 0),
                                      stop_reason=delta.stop_reason)


def _role_chunk(prep: _Prepared, extra: Dict[str, Any]) -> str:
    """The first chunk of every choice carries the role, as OpenAI's does."""
    choices = [ChatCompletionStreamChoice(index=i,
                                          delta=DeltaMessage(role="assistant", content=""),
                                          logprobs=None, finish_reason=None)
               for i in range(prep.params.n)]
    return _chunk(prep, choices, **extra)


async def _stream(prep: _Prepared, first: RequestOutput,
                  outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    tracker = DeltaTracker()
    usage_field: Dict[str, Any] = {"usage": None} if prep.req.include_usage else {}
    final = first
    try:
        yield _role_chunk(prep, usage_field)
        out: Optional[RequestOutput] = first
        while out is not None:
            final = out
            for c in out.outputs:
                choice = _delta_choice(prep, tracker, c)
                if choice is not None:
                    yield _chunk(prep, [choice], **usage_field)
            out = await anext(outputs, None)
        if prep.req.include_usage:
            yield _chunk(prep, [], usage=prep.usage(final))
    except Exception as exc:  # headers are out: report in-band, then end the stream
        yield sse_error_event(to_api_error(exc))
    finally:
        await outputs.aclose()
    yield SSE_DONE
