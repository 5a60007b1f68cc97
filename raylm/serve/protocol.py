"""OpenAI request models (pydantic v2), with vLLM's sampling extras.

Unknown fields are ignored (OpenAI clients send fields we have no use for), but the fields
we read are typed strictly: a string where a number belongs is a 400, never coerced.
Ranges mirror `SamplingParams`; `to_sampling_params` builds one and lets it do the final
validation (its ValueError names the field; the app maps it to a 400). The shared pieces
(strict scalars, the error, the chat message) live in `raylm.serve.protocol_common`, response
models in `raylm.serve.protocol_responses`; both are re-exported here.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Dict, List, Optional, Union

from pydantic import Field, model_validator

from raylm.sampling_params import SamplingParams, StructuredOutputsParams
from raylm.serve.protocol_common import (ChatMessage, InvalidRequestError, OpenAIModel, SBool,
                                         SFloat, SInt, SStr, StreamOptions)
from raylm.serve.protocol_structured import (ChatTool, NamedToolChoice, ResponseFormat,
                                             StructuredFields, ToolChoice)
from raylm.serve.tools import ToolPlan
from raylm.serve.protocol_responses import *  # noqa: F401,F403  (one import surface for clients)


class _SamplingRequest(StructuredFields, OpenAIModel):
    """Fields shared by completions and chat: OpenAI's sampling options plus vLLM's extras
    (the output constraints among them: raylm.serve.protocol_structured)."""

    prompt_field: ClassVar[str] = "prompt"  # the field a too-long prompt error points at

    model: Optional[SStr] = None
    n: SInt = Field(default=1, ge=1, le=128)
    temperature: Optional[SFloat] = Field(default=None, ge=0)
    top_p: Optional[SFloat] = Field(default=None, gt=0, le=1)
    stream: SBool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[None, SStr, List[SStr]] = None
    seed: Optional[SInt] = None
    presence_penalty: Optional[SFloat] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[SFloat] = Field(default=None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, SFloat]] = None  # token id (a JSON key: a string) -> bias
    user: Optional[SStr] = None
    # vLLM extras
    top_k: Optional[SInt] = Field(default=None, ge=-1)
    min_p: Optional[SFloat] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[SFloat] = Field(default=None, gt=0, le=2)
    min_tokens: SInt = Field(default=0, ge=0)
    ignore_eos: SBool = False
    stop_token_ids: Optional[List[SInt]] = None
    skip_special_tokens: SBool = True
    include_stop_str_in_output: SBool = False
    prompt_logprobs: Optional[SInt] = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_common(self):
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      "stream_options")
        if self.prompt_logprobs is not None and self.stream:
            raise InvalidRequestError("prompt_logprobs is not supported with stream (with echo, "
                                      "completions' logprobs include the prompt's, streamed)",
                                      "prompt_logprobs")
        self.token_bias()  # a bad key or value is a 400 now, not when sampling
        self.constraint()
        return self

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The output constraint, if any (an incomplete one or two of them: a 400 naming it)."""
        try:
            return self.structured_params(getattr(self, "response_format", None))
        except ValueError as exc:
            raise InvalidRequestError(str(exc), re.match(r"[a-z_]*", str(exc)).group()) from None

    def token_bias(self) -> Optional[Dict[int, float]]:
        """logit_bias with integer token ids (OpenAI sends them as JSON object keys)."""
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not (key.isascii() and key.isdigit()):
                raise InvalidRequestError(f"logit_bias keys must be token ids (got {key!r})",
                                          "logit_bias")
            if not -100 <= value <= 100:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100] (got {value} "
                                          f"for token {key})", "logit_bias")
            bias[int(key)] = value
        return bias

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _requested_max_tokens(self) -> Optional[int]:
        return getattr(self, "max_tokens", None)

    def _logprobs(self) -> Optional[int]:
        return None

    def _prompt_logprobs(self) -> Optional[int]:
        return self.prompt_logprobs

    def to_sampling_params(self, max_model_len: int, prompt_len: int) -> SamplingParams:
        """SamplingParams for one prompt of `prompt_len` tokens. max_tokens defaults to the
        rest of the context; asking for more than fits is an error (vLLM's behaviour)."""
        remaining = max_model_len - prompt_len
        if remaining <= 0:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_model_len} tokens, and the prompt "
                f"has {prompt_len} tokens: it must leave room for at least one generated token.",
                self.prompt_field)
        max_tokens = self._requested_max_tokens()
        if max_tokens is None:
            max_tokens = remaining
        elif max_tokens > remaining:
            raise InvalidRequestError(
                f"max_tokens is too large: {max_tokens}. This model's maximum context length is "
                f"{max_model_len} tokens and the prompt has {prompt_len} tokens, so at most "
                f"{remaining} tokens can be generated. Reduce max_tokens or the prompt.",
                "max_tokens")
        return SamplingParams(**self._sampling_kwargs(max_tokens))

    def _sampling_kwargs(self, max_tokens: int) -> Dict[str, Any]:
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "min_p": self.min_p, "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty,
                    "repetition_penalty": self.repetition_penalty}
        kwargs = {k: v for k, v in optional.items() if v is not None}
        kwargs.update(n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, seed=self.seed,
                      stop=self.stop, stop_token_ids=self.stop_token_ids,
                      ignore_eos=self.ignore_eos, logprobs=self._logprobs(),
                      prompt_logprobs=self._prompt_logprobs(), logit_bias=self.token_bias(),
                      structured_outputs=self.constraint(),
                      skip_special_tokens=self.skip_special_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output)
        return kwargs


PromptInput = Union[SStr, List[SStr], List[SInt], List[List[SInt]]]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is text, token ids, or a batch of either."""

    prompt: PromptInput
    # None means the rest of the context, as for chat; 0 (with echo) scores the prompt only.
    # OpenAI's and vLLM's default for completions
    max_tokens: Optional[SInt] = Field(default=16, ge=0)
    logprobs: Optional[SInt] = Field(default=None, ge=0, le=20)
    echo: SBool = False
    best_of: Optional[SInt] = Field(default=None, ge=1)
    suffix: Optional[SStr] = None

    @model_validator(mode="after")
    def _check_completion(self):
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of different from n is not supported", "best_of")
        if self.suffix:
            raise InvalidRequestError("suffix is not supported by this server", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens must be at least 1 (0 only with echo, to score "
                                      "a prompt)",
                                      "max_tokens")
        return self

    @property
    def scoring_only(self) -> bool:
        """echo with max_tokens 0 (how evaluation harnesses score text): the engine samples
        one token, which the response leaves out."""
        return self.max_tokens == 0

    def _requested_max_tokens(self) -> Optional[int]:
        return 1 if self.scoring_only else self.max_tokens

    def _prompt_logprobs(self) -> Optional[int]:
        if self.prompt_logprobs is None and self.echo:
            return self.logprobs  # echo's logprobs start with the prompt's
        return self.prompt_logprobs

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompt batch: each item is text or token ids; an empty prompt is an error."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            batch = [p]
        else:
            batch = list(p)
        if not batch or any(len(item) == 0 for item in batch):
            raise InvalidRequestError("prompt must not be empty", "prompt")
        return batch

    def _logprobs(self) -> Optional[int]:
        return self.logprobs


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[SInt] = Field(default=None, ge=1)
    max_completion_tokens: Optional[SInt] = Field(default=None, ge=1)
    logprobs: SBool = False
    top_logprobs: Optional[SInt] = Field(default=None, ge=0, le=20)
    tools: Optional[List[ChatTool]] = None
    tool_choice: Optional[ToolChoice] = None
    response_format: Optional[ResponseFormat] = None
    # vLLM extras
    add_generation_prompt: SBool = True
    chat_template_kwargs: Optional[Dict[str, Any]] = None

    prompt_field: ClassVar[str] = "messages"

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        self.tool_plan()
        return self

    def tool_plan(self) -> ToolPlan:
        """What tools and tool_choice ask for (a 400 naming the field when they disagree)."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        choice = (self.tool_choice if self.tool_choice is not None
                  else ("auto" if tools else "none"))
        if isinstance(choice, NamedToolChoice):
            names = [t["function"]["name"] for t in tools]
            if choice.function.name not in names:
                raise InvalidRequestError(f"tool_choice names {choice.function.name!r}, which is "
                                          f"not in tools ({', '.join(names) or 'none given'})",
                                          "tool_choice")
            return ToolPlan("named", tools, choice.function.name)
        if choice in ("auto", "required") and not tools:
            raise InvalidRequestError(f"tool_choice {choice!r} needs tools", "tool_choice")
        return ToolPlan(choice, tools)

    def constraint(self) -> Optional[StructuredOutputsParams]:
        plan = self.tool_plan()
        own = super().constraint()
        if plan.constrained and own is not None:
            raise InvalidRequestError(f"tool_choice {plan.mode!r} constrains the output itself: "
                                      f"it cannot be combined with {own.field}", "tool_choice")
        return plan.constraint() if plan.constrained else own

    def _requested_max_tokens(self) -> Optional[int]:
        return (self.max_completion_tokens if self.max_completion_tokens is not None
                else self.max_tokens)

    def _logprobs(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> List[Dict[str, Any]]:
        return [m.to_template_dict() for m in self.messages]


class TokenizeRequest(OpenAIModel):
    """POST /tokenize: either `prompt` (text) or `messages` (through the chat template)."""

    model: Optional[SStr] = None
    prompt: Optional[SStr] = None
    messages: Optional[List[ChatMessage]] = None
    add_special_tokens: SBool = True
    add_generation_prompt: SBool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", "prompt")
        return self


class DetokenizeRequest(OpenAIModel):
    model: Optional[SStr] = None
    tokens: List[SInt]
