"""Structured outputs and tool calls over HTTP (SmolLM2 behind the OpenAI app, no Ray), with
the official openai client: response_format json_schema and the SDK's `parse` with a
pydantic model, vLLM's guided fields, tool_choice required / named / auto, streamed and not.
Every JSON is checked with jsonschema or pydantic, every call against its tool."""
from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from raylm.config import CacheConfig, EngineConfig, ModelConfig
from tests.openai_server import API_KEY, post_stream, serving, wait_all_free

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}}}}
TOOLS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "Rome", "Oslo"]


@pytest.fixture(scope="module")
def smol():
    config = EngineConfig(model=ModelConfig(model="smollm2-135m-instruct", max_model_len=1024),
                          cache=CacheConfig(num_blocks=256))
    yield from serving(config, "smol")


@pytest.fixture(scope="module")
def client(smol):
    import openai

    return openai.OpenAI(base_url=f"{smol.auth_url}/v1", api_key=API_KEY, max_retries=0)


def _check_calls(calls, names):
    assert calls, "no tool calls"
    for call in calls:
        assert (call.type == "function" and call.id.startswith("call_")
                and call.function.name in names)
        jsonschema.validate(json.loads(call.function.arguments), TOOLS[call.function.name])


def test_response_format_json_schema_and_sdk_parse(client, smol):
    schema = Person.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    out = client.chat.completions.create(model="smol",
                                         messages=[{"role": "user",
                                                    "content": "A person, as JSON"}],
                                         response_format=fmt, n=6, temperature=1.0, seed=4,
                                         max_tokens=80)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    parsed = client.chat.completions.parse(model="smol",
                                           messages=[{"role": "user", "content": "A person"}],
                                           response_format=Person, temperature=0, max_tokens=80)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    stream = client.chat.completions.create(model="smol",
                                            messages=[{"role": "user", "content": "A person"}],
                                            response_format={"type": "json_object"}, temperature=0,
                                            max_tokens=120, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    wait_all_free(smol.engine)


@pytest.mark.parametrize("field, value, check", [
    ("guided_regex", r"[0-9]{2}:[0-9]{2}", lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2}", t)),
    ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
    ("structured_outputs", {"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ("guided_json", {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
     lambda t: isinstance(json.loads(t), list)),
])
def test_vllm_guided_fields_on_completions(smol, field, value, check):
    body = {"model": "smol", "prompt": "Answer:", "max_tokens": 40, "temperature": 1.0, "seed": 2,
            "n": 4, field: value}
    r = smol.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        assert choice["finish_reason"] == "stop" and check(choice["text"]), choice["text"]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_always_parse(client, smol, stream):
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, names, finish in (("required", set(TOOLS), "tool_calls"),
                                  (named, {"get_time"}, "stop")):
        kwargs = dict(model="smol", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                      max_tokens=80, temperature=1.0, seed=5)
        if not stream:
            out = client.chat.completions.create(**kwargs).choices[0]
            # forced: "stop", as OpenAI
            assert out.finish_reason == finish and out.message.content is None
            _check_calls(out.message.tool_calls, names)
            continue
        chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True)
                  if c.choices]
        calls = [tc for c in chunks for tc in c.delta.tool_calls or []]
        assert [tc.index for tc in calls] == list(range(len(calls)))
        assert chunks[-1].finish_reason == finish
        assert not "".join(c.delta.content or "" for c in chunks)
        _check_calls(calls, names)
    wait_all_free(smol.engine)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_auto_reads_hermes_calls(smol, stream):
    """The model's text decides under auto: a guided regex makes it write one call after some
    words, so the parser's work on real engine output is checked deterministically."""
    regex = (r'Checking\. <tool_call>\{"name": "get_weather", '
             r'"arguments": \{"city": "Oslo", "unit": "C"\}\}</tool_call>')
    body = {"model": "smol", "messages": ASK, "tools": [WEATHER], "max_tokens": 60,
            "temperature": 0, "guided_regex": regex}
    if stream:
        events = post_stream(smol.http, "/v1/chat/completions", {**body, "stream": True})
        deltas = [e["choices"][0] for e in events[:-1] if e["choices"]]
        content = "".join(d["delta"].get("content") or "" for d in deltas)
        calls = [tc for d in deltas for tc in d["delta"].get("tool_calls") or []]
        finish = deltas[-1]["finish_reason"]
    else:
        msg = smol.http.post("/v1/chat/completions", json=body).json()["choices"][0]
        content, calls, finish = (msg["message"]["content"], msg["message"]["tool_calls"],
                                  msg["finish_reason"])
    assert content.strip() == "Checking." and finish == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"})]
    wait_all_free(smol.engine)


def test_a_conversation_with_tool_results_renders(smol):
    messages = ASK + [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C, snow"}]
    r = smol.http.post("/v1/chat/completions",
                       json={"model": "smol", "messages": messages, "tools": [WEATHER],
                             "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] > 100  # the tools' description and the call went in


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": "x"}]},
                   {"role": "user", "content": "hi"}]},
     "messages"),
])
def test_bad_constraints_are_400s_naming_the_field(smol, body, param):
    r = smol.http.post("/v1/chat/completions",
                       json={"model": "smol", "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    wait_all_free(smol.engine)
