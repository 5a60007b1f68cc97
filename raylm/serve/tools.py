"""Tool calling on chat: what `tools` and `tool_choice` ask of a request (`ToolPlan`).

"auto": the tools reach the model (through its chat template, or, if the template ignores
them, described by the parser in the system message) and the parser reads calls out of the
text. "required" and a named function: the output is constrained to the calls' JSON (a
non-empty list of {name, arguments}, or the named function's arguments), so the call
always parses. "none": the tools are not shown and nothing is parsed.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from raylm.sampling_params import StructuredOutputsParams
from raylm.serve.tool_parsers import BaseToolParser, BaseToolStream, ParsedCall


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    # OpenAI's {"type": "function", "function": {...}}
    tools: List[Dict[str, Any]] = field(default_factory=list)
    name: Optional[str] = None  # the named function

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> Optional[StructuredOutputsParams]:
        """The output's grammar for "required" / named; None otherwise."""
        if self.mode == "named":
            return StructuredOutputsParams(json=_parameters(self._function(self.name)),
                                           field="tool_choice")
        if self.mode != "required":
            return None
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "arguments"],
                  "properties": {"name": {"const": t["function"]["name"]},
                                 "arguments": _parameters(t["function"])}} for t in self.tools]
        schema = {"type": "array", "minItems": 1,
                  "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
        return StructuredOutputsParams(json=schema, field="tool_choice")

    def template_tools(self) -> Optional[List[Dict[str, Any]]]:
        return None if self.mode == "none" else self.tools

    def calls(self, text: str, parser: BaseToolParser) -> Tuple[Optional[str], List[ParsedCall]]:
        """(content, calls) of a finished output."""
        if self.mode == "auto":
            return parser.parse(text)
        if self.mode == "named":
            return None, [ParsedCall(self.name, text)]
        if self.mode == "required":
            try:
                items = json.loads(text)
            except ValueError:  # cut off by max_tokens: not a call
                return text, []
            return None, [ParsedCall(c["name"], json.dumps(c["arguments"], ensure_ascii=False))
                          for c in items]
        return text, []

    def _function(self, name: str) -> Dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)


def _parameters(function: Dict[str, Any]) -> Dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


class ToolStream:
    """One streamed choice's tool calls: content passes through (auto) or is held until the
    end (constrained: the whole output is the calls' JSON)."""

    def __init__(self, plan: ToolPlan, parser: BaseToolParser) -> None:
        self.plan, self.parser = plan, parser
        self.stream: Optional[BaseToolStream] = parser.stream() if plan.mode == "auto" else None
        self.held = ""
        self.num_calls = 0

    def feed(self, text: str, finished: bool) -> Tuple[str, List[ParsedCall]]:
        if self.plan.mode == "none":
            return text, []
        if self.stream is None:  # constrained
            self.held += text
            if not finished:
                return "", []
            content, calls = self.plan.calls(self.held, self.parser)
            return content or "", calls
        content, calls = self.stream.feed(text)
        if finished:
            content += self.stream.finish()
        return content, calls
