"""OpenAI response models: completions, chat, stream chunks, usage, logprobs, models, errors.

Shapes follow OpenAI's API reference; `stop_reason` on choices is vLLM's extra (the stop
string or token id that ended the choice).
"""
from __future__ import annotations

import time
from typing import Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


def _now() -> int:
    return int(time.time())


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ErrorInfo(_Out):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(_Out):
    """The body of every non-2xx answer: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo


# ---- models -----------------------------------------------------------------------

class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "raylm"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: List[ModelCard] = Field(default_factory=list)


# ---- completions ------------------------------------------------------------------

class CompletionLogprobs(_Out):
    """Legacy completions logprobs: parallel lists, one entry per generated token."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class PromptLogprob(_Out):
    """vLLM's `prompt_logprobs` entry: one per candidate token of a prompt position."""

    logprob: float
    rank: int
    decoded_token: Optional[str] = None


# One per prompt token (None for the first), keyed by token id: vLLM's `prompt_logprobs`.
PromptLogprobs = List[Optional[Dict[str, PromptLogprob]]]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    prompt_logprobs: Optional[PromptLogprobs] = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None


class CompletionStreamResponse(_Out):
    """One SSE chunk of a streamed completion (choices carry text deltas)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---- chat -------------------------------------------------------------------------

class ChatTopLogprob(_Out):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatLogprobToken(ChatTopLogprob):
    top_logprobs: List[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Out):
    content: Optional[List[ChatLogprobToken]] = None
    refusal: Optional[List[ChatLogprobToken]] = None


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON text


class ToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(_Out):
    """A streamed call: here each arrives whole, in one delta."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: List[ToolCall] = Field(default_factory=list)


class ChatCompletionChoice(_Out):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[ChatCompletionChoice]
    usage: UsageInfo
    system_fingerprint: Optional[str] = None
    prompt_logprobs: Optional[PromptLogprobs] = None


class DeltaMessage(_Out):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[List[DeltaToolCall]] = None


class ChatCompletionStreamChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(_Out):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: List[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- tokenizer endpoints ----------------------------------------------------------

class TokenizeResponse(_Out):
    tokens: List[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    prompt: str


__all__ = [
    "UsageInfo", "ErrorInfo", "ErrorResponse", "ModelCard", "ModelList", "CompletionLogprobs",
    "PromptLogprob", "PromptLogprobs", "CompletionChoice", "CompletionResponse",
    "CompletionStreamResponse", "ChatTopLogprob",
    "ChatLogprobToken", "ChatLogprobs", "FunctionCall", "ToolCall", "DeltaToolCall",
    "ChatResponseMessage", "ChatCompletionChoice",
    "ChatCompletionResponse", "DeltaMessage", "ChatCompletionStreamChoice",
    "ChatCompletionStreamResponse", "TokenizeResponse", "DetokenizeResponse",
]
