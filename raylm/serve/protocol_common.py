"""What the OpenAI request models share: strict scalars (JSON "5" is not an int, 1 is not a
bool, NaN and Infinity are not numbers), the 400 error naming its field, the base model that
ignores unknown fields, and one chat message (chat completions and /tokenize take a list)."""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import AllowInfNan, BaseModel, ConfigDict, Strict, field_validator

from raylm.serve.protocol_structured import MessageToolCall

SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict(), AllowInfNan(False)]
SStr = Annotated[str, Strict()]
SBool = Annotated[bool, Strict()]


class InvalidRequestError(ValueError):
    """A request the server understood but will not run; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class StreamOptions(OpenAIModel):
    include_usage: Optional[SBool] = False


class ChatMessage(OpenAIModel):
    """One chat turn. `content` may be a string or a list of text parts (joined with newlines);
    an assistant turn may hold the `tool_calls` it made, a tool turn its `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[None, str, List[Dict[str, Any]]] = None
    name: Optional[SStr] = None
    tool_calls: Optional[List[MessageToolCall]] = None
    tool_call_id: Optional[SStr] = None

    @field_validator("content")
    @classmethod
    def _only_text(cls, value):
        if isinstance(value, list):
            parts = []
            for part in value:
                if part.get("type") != "text":
                    raise InvalidRequestError(f"content part type {part.get('type')!r} is not "
                                              "supported (only 'text')", "messages")
                if not isinstance(part.get("text"), str):
                    raise InvalidRequestError("a text content part needs a string 'text'",
                                              "messages")
                parts.append(part["text"])
            return "\n".join(parts)
        return value

    def to_template_dict(self) -> Dict[str, Any]:
        out = {"role": self.role, "content": self.content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.to_template_dict() for c in self.tool_calls]
        return out
