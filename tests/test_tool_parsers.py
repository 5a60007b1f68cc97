"""The Hermes tool-call parser against hand-written outputs: whole and streamed (split at
every position) give the same content and calls; a block that is not a call stays text."""
from __future__ import annotations

import json

import pytest

from raylm.serve.tool_parsers import ParsedCall, create_tool_parser, tool_parser_names

TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": '
        '"Oslo"}}\n</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call> done '
        '<tool_call>not json</tool_call> <tool')
CALLS = [ParsedCall("get_weather", '{"city": "Oslo"}'), ParsedCall("get_time", "{}")]
CONTENT = "Let me check.  done <tool_call>not json</tool_call> <tool"


def test_hermes_parses_calls_and_keeps_the_rest_as_content():
    parser = create_tool_parser("hermes")
    assert parser.parse(TEXT) == (CONTENT, CALLS)
    assert parser.parse("plain answer") == ("plain answer", [])
    assert parser.parse('<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>') == (
        None, [ParsedCall("f", '{"x": 1}')])
    assert parser.parse('<tool_call>{"name": "f", "arguments": {}}') == (
        '<tool_call>{"name": "f", "arguments": {}}', [])  # never closed: text


@pytest.mark.parametrize("size", [1, 2, 5, 11])
def test_hermes_stream_equals_whole(size):
    stream = create_tool_parser("hermes").stream()
    content, calls = "", []
    for i in range(0, len(TEXT), size):
        text, new = stream.feed(TEXT[i:i + size])
        assert "<tool_call>{" not in text or "not json" in text  # a real call never leaks as text
        content, calls = content + text, calls + new
    content += stream.finish()
    assert (content.strip(), calls) == (CONTENT, CALLS)


def test_render_describes_tools_and_writes_earlier_calls_as_text():
    tools = [{"type": "function",
              "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    conversation = [{"role": "user", "content": "time?"},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"id": "c1", "type": "function",
                         "function": {"name": "get_time", "arguments": "{}"}}]},
                    {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]
    out = create_tool_parser("hermes").render(conversation, tools)
    assert out[0]["role"] == "system" and json.dumps(tools[0]["function"]) in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert out[3] == {"role": "tool", "content": "<tool_response>\n12:00\n</tool_response>"}
    assert conversation[1]["tool_calls"]  # the request's own messages are left alone


def test_unknown_parser_is_a_value_error():
    assert "hermes" in tool_parser_names()
    with pytest.raises(ValueError, match="tool_call_parser must be one of"):
        create_tool_parser("nope")
