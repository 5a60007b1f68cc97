"""Tool-call parsers: how a model writes a tool call in its text, and how to read it back.

A parser turns a finished output into (content, calls) and, for streams, hands out content
deltas and whole calls as the text grows (`BaseToolStream`). It also says how to show the
tools to a model whose chat template does not render them. Parsers register by name
(`--tool-call-parser`). `tool_choice` "required" or a named function does not go through a
parser: the output is constrained to the call's JSON (raylm.serve.tools), so it always parses.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from raylm.registry import Registry


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's `function.arguments`


class BaseToolStream(ABC):
    """One streamed choice: feed it the text as it grows."""

    @abstractmethod
    def feed(self, delta: str) -> Tuple[str, List[ParsedCall]]:
        """(content that is certainly not part of a call, calls completed by this delta)."""

    @abstractmethod
    def finish(self) -> str:
        """The text still held back (an unfinished call or tag prefix) as content."""


class BaseToolParser(ABC):
    name: str = ""

    @abstractmethod
    def parse(self, text: str) -> Tuple[Optional[str], List[ParsedCall]]:
        """(content outside calls, None if blank; the calls, in order)."""

    @abstractmethod
    def stream(self) -> BaseToolStream:
        """A parser state for one streamed choice."""

    @abstractmethod
    def render(self, conversation: List[Dict[str, Any]],
               tools: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The conversation for a chat template that ignores tools: the tools described in
        the system message, earlier calls and results written as this format's text."""


_PARSERS = Registry("tool_call_parser")
register_tool_parser = _PARSERS.register


def tool_parser_names() -> List[str]:
    return sorted(_PARSERS)


def create_tool_parser(name: str) -> BaseToolParser:
    return _PARSERS.lookup(name, tool_parser_names())()


def _call(payload: str) -> Optional[ParsedCall]:
    """A call from `{"name": ..., "arguments": {...}}` JSON; None if it is not one."""
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ParsedCall(obj["name"],
                      args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


@register_tool_parser("hermes")
class HermesToolParser(BaseToolParser):
    """Calls as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (the Hermes and
    Qwen format); a block whose JSON is not a call stays in the content."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> Tuple[Optional[str], List[ParsedCall]]:
        stream = self.stream()
        content, calls = stream.feed(text)
        content += stream.finish()
        return (content.strip() or None), calls

    def stream(self) -> BaseToolStream:
        return _HermesStream(self.OPEN, self.CLOSE)

    def render(self, conversation: List[Dict[str, Any]],
               tools: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        specs = "\n".join(json.dumps(t.get("function", t), ensure_ascii=False) for t in tools)
        prompt = ("You can call functions. Their signatures, one JSON object per line, are inside "
                  f"<tools></tools>:\n<tools>\n{specs}\n</tools>\nTo call one, answer with "
                  f'{self.OPEN}\n{{"name": "<function name>", '
                  f'"arguments": {{<arguments as JSON>}}}}\n'
                  f"{self.CLOSE}\nOne block per call; the results come back inside "
                  "<tool_response> tags.")
        out = [dict(m) for m in conversation]
        if tools and out and out[0]["role"] in ("system", "developer"):
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
        elif tools:
            out.insert(0, {"role": "system", "content": prompt})
        for m in out:
            if m.get("tool_calls"):
                calls = [json.dumps(_call_json(c), ensure_ascii=False)
                         for c in m.pop("tool_calls")]
                blocks = [f"{self.OPEN}\n{call}\n{self.CLOSE}" for call in calls]
                m["content"] = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            if m["role"] == "tool":
                m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
                m.pop("tool_call_id", None)
        return out


def _call_json(call: Dict[str, Any]) -> Dict[str, Any]:
    fn = call.get("function", {})
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return {"name": fn.get("name"), "arguments": args}


class _HermesStream(BaseToolStream):
    def __init__(self, open_tag: str, close_tag: str) -> None:
        self.open, self.close = open_tag, close_tag
        self.buffer = ""  # text not yet handed out
        self.in_call = False

    def feed(self, delta: str) -> Tuple[str, List[ParsedCall]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            if self.in_call:
                end = self.buffer.find(self.close)
                if end < 0:
                    return content, calls
                block, self.buffer = self.buffer[:end], self.buffer[end + len(self.close):]
                self.in_call = False
                call = _call(block.strip())
                if call is None:  # not a call after all: it was text
                    content += f"{self.open}{block}{self.close}"
                else:
                    calls.append(call)
                continue
            start = self.buffer.find(self.open)
            if start < 0:  # hold back what may be the start of a tag
                keep = _partial_suffix(self.buffer, self.open)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return content, calls
            content += self.buffer[:start]
            self.buffer = self.buffer[start + len(self.open):]
            self.in_call = True

    def finish(self) -> str:
        held = (self.open if self.in_call else "") + self.buffer
        self.buffer, self.in_call = "", False
        return held


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
