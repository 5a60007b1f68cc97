"""What every OpenAI route handler shares: the engine client, served model names, and
prompt preparation (tokenization, chat template) with errors that name the field."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from raylm.serve.engine_client import EngineClient
from raylm.serve.errors import bad_request, model_not_found
from raylm.outputs import PositionLogprobs
from raylm.serve.protocol import PromptLogprob, PromptLogprobs, UsageInfo
from raylm.serve.tool_parsers import create_tool_parser

# Logprobs of -inf cannot go into JSON; OpenAI-compatible servers send a large negative number.
MIN_LOGPROB = -9999.0

# apply_chat_template arguments a request's chat_template_kwargs may not override.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "return_dict", "add_generation_prompt",
                             "tools", "chat_template", "return_tensors", "padding", "truncation",
                             "max_length", "tokenizer_kwargs", "documents",
                             "continue_final_message", "return_assistant_tokens_mask"}


def clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isinf(value) or math.isnan(value) else max(value, MIN_LOGPROB)


def prompt_logprobs_field(
        positions: Optional[Sequence[Optional[PositionLogprobs]]]) -> Optional[PromptLogprobs]:
    """vLLM's `prompt_logprobs` response field from the engine's (None when not asked)."""
    if positions is None:
        return None
    return [None if p is None
            else {str(t): PromptLogprob(logprob=clamp_logprob(lp.logprob), rank=lp.rank,
                                        decoded_token=lp.decoded_token)
                  for t, lp in p.items()} for p in positions]


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def check_text(text: str, param: str) -> str:
    """`text` if it is valid Unicode; a lone surrogate (JSON "\\ud800") cannot be encoded or
    tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: {exc.reason} at position {exc.start}",
                          param) from None
    return text


class ServingContext:
    """The engine client, the model names this server answers to, and how it reads tool
    calls out of the model's text (`tool_call_parser`, raylm.serve.tool_parsers)."""

    def __init__(self, client: EngineClient, aliases: Optional[Iterable[str]] = None,
                 tool_call_parser: str = "hermes") -> None:
        self.client = client
        self.model_names: List[str] = list(dict.fromkeys([client.model_name, *(aliases or [])]))
        self.tool_parser = create_tool_parser(tool_call_parser)

    @property
    def tokenizer(self) -> Any:
        return self.client.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.client.max_model_len

    def resolve_model(self, requested: Optional[str]) -> str:
        """The name to echo back; a name we do not serve is a 404."""
        if requested is None:
            return self.model_names[0]
        if requested not in self.model_names:
            raise model_not_found(requested)
        return requested

    def encode(self, prompt: Union[str, Sequence[int]],
               add_special_tokens: bool = True) -> List[int]:
        """Token ids of a text or token-id prompt; every id checked against the vocabulary here,
        so a bad prompt anywhere in a batch is a 400 before any of it runs or is echoed."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(check_text(prompt, "prompt"),
                                             add_special_tokens=add_special_tokens))
        else:
            ids = list(prompt)
            self.check_token_ids(ids, "prompt")
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        return ids

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param} contains ids outside the vocabulary (size {vocab}): "
                              f"{bad[:5]}", param)

    def apply_chat_template(self, conversation: List[Dict[str, Any]],
                            add_generation_prompt: bool = True,
                            template_kwargs: Optional[Dict[str, Any]] = None,
                            tools: Optional[List[Dict[str, Any]]] = None) -> List[int]:
        """Token ids of the conversation through the tokenizer's chat template (400 when the
        model has none or the template rejects the conversation). `tools` go to a template
        that renders them; for one that does not, the tool parser writes them into the
        conversation (a system message describing them, earlier calls as its text)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("This model's tokenizer has no chat template; use /v1/completions.",
                              "messages")
        extra = {k: v for k, v in (template_kwargs or {}).items()
                 if k not in _RESERVED_TEMPLATE_KWARGS}
        native = "tools" in str(tok.chat_template)  # (a dict of named templates: any of them)
        if native and tools:
            extra["tools"] = tools
        elif not native and (tools or any(m.get("tool_calls") for m in conversation)):
            conversation = self.tool_parser.render(conversation, tools or [])
        try:
            out = tok.apply_chat_template(conversation,
                                          add_generation_prompt=add_generation_prompt,
                                          tokenize=True, return_dict=True, **extra)
        # jinja errors (e.g. raise_exception in the template) are the request's fault
        except Exception as exc:
            # the first line only: some errors carry the tokenizer's repr (and its files' paths)
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise bad_request(f"The chat template could not render these messages: {reason}",
                              "messages") from exc
        ids = list(out["input_ids"])
        if not ids:
            raise bad_request("messages rendered to an empty prompt", "messages")
        return ids
