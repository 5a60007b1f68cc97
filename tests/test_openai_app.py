"""The OpenAI HTTP layer over an in-process AsyncEngine (real uvicorn servers, no Ray):
results equal the offline `LLM` on the same weights and prompts (greedy, seeded sampling,
logprobs, stop strings), streams equal non-streams, usage is exact, the official client works.
Chat prompts are built by hand from the tiny word-level vocabulary (word wK has id K + 3),
independent of the chat-template code path."""
from __future__ import annotations

import pytest

from raylm import LLM, SamplingParams
from tests.openai_server import (API_KEY, post_stream, srv, wait_all_free, whole_and_stream,
                                 word_ids)  # noqa: F401 (srv: fixture)


@pytest.fixture(scope="module")
def ref(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", max_model_len=128, num_blocks=64)


def offline(ref, prompt, **params):
    return ref.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


# ---- happy paths ------------------------------------------------------------------

def test_models_health_version(srv):
    models = srv.http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny", "tiny-alias"]
    assert models["data"][0]["max_model_len"] == 128
    assert srv.http.get("/health").status_code == 200
    # LB probes
    assert all(srv.http.head(p).status_code == 200 for p in ("/health", "/version", "/v1/models"))
    assert srv.http.get("/version").json()["version"]


def test_completions_equal_offline_and_usage_exact(srv, ref):
    prompts = ["w5 w6 w7 w8", "w9 w10 w11"]
    body = {"model": "tiny-alias", "prompt": prompts, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    r = srv.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["model"] == "tiny-alias"
    expected = [offline(ref, p, temperature=0, max_tokens=12, ignore_eos=True) for p in prompts]
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert [c["text"] for c in data["choices"]] == [e.outputs[0].text for e in expected]
    assert all(c["finish_reason"] == "length" for c in data["choices"])
    assert data["usage"] == {"prompt_tokens": 4 + 3, "completion_tokens": 24, "total_tokens": 31}
    # token-id prompts, batched
    ids = [[12, 13, 14], [15, 16]]
    data = srv.http.post("/v1/completions", json={**body, "prompt": ids, "max_tokens": 5}).json()
    expected = [offline(ref, {"prompt_token_ids": p}, temperature=0, max_tokens=5, ignore_eos=True)
                for p in ids]
    assert [c["text"] for c in data["choices"]] == [e.outputs[0].text for e in expected]
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}
    wait_all_free(srv.engine)


def test_stream_equals_non_stream(srv):
    body = {"model": "tiny", "prompt": "w20 w21 w22", "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    whole, chunks, usage_chunk = whole_and_stream(srv.http, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("length") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 10 and whole["usage"]["prompt_tokens"] == 3


def test_default_max_tokens(srv):
    """Completions default to 16 tokens (OpenAI, vLLM); an explicit null means the rest of the
    context."""
    body = {"model": "tiny", "prompt": [5] * 100, "temperature": 0, "ignore_eos": True}
    r = srv.http.post("/v1/completions", json=body)
    assert r.json()["usage"] == {"prompt_tokens": 100, "completion_tokens": 16,
                                 "total_tokens": 116}
    r = srv.http.post("/v1/completions", json={**body, "max_tokens": None})
    assert r.json()["usage"] == {"prompt_tokens": 100, "completion_tokens": 28,
                                 "total_tokens": 128}
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_echo(srv):
    body = {"model": "tiny", "prompt": "w5 w6", "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    plain = srv.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    echoed = srv.http.post("/v1/completions", json={**body, "echo": True}).json()
    assert (echoed["choices"][0]["text"] == "w5 w6" + plain
            and echoed["usage"]["completion_tokens"] == 3)
    events = post_stream(srv.http, "/v1/completions", {**body, "echo": True, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "w5 w6" + plain


def test_chat_equals_offline_and_streams(srv, ref):
    messages = [{"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}]
    prompt_ids = word_ids(1, 5, 6, 2)
    tok = srv.http.post("/tokenize", json={"messages": messages}).json()
    assert tok["tokens"] == prompt_ids and tok["count"] == 4 and tok["max_model_len"] == 128
    body = {"model": "tiny", "messages": messages, "max_completion_tokens": 9, "temperature": 0,
            "ignore_eos": True}
    data = srv.http.post("/v1/chat/completions", json=body).json()
    expected = offline(ref, {"prompt_token_ids": prompt_ids}, temperature=0, max_tokens=9,
                       ignore_eos=True)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"] == {"role": "assistant",
                                             "content": expected.outputs[0].text, "refusal": None,
                                             "tool_calls": []}
    assert data["usage"] == {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
    events = post_stream(srv.http, "/v1/chat/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"] == {"role": "assistant",
                                                                           "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[1:-1])
    assert text == expected.outputs[0].text
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_n2_seeded_equals_offline(srv, ref):
    body = {"model": "tiny", "prompt": "w30 w31", "n": 2, "seed": 7, "temperature": 1.0,
            "max_tokens": 8, "ignore_eos": True}
    data = srv.http.post("/v1/completions", json=body).json()
    expected = offline(ref, "w30 w31", n=2, seed=7, temperature=1.0, max_tokens=8, ignore_eos=True)
    assert [c["index"] for c in data["choices"]] == [0, 1]
    assert [c["text"] for c in data["choices"]] == [o.text for o in expected.outputs]
    assert data["usage"]["completion_tokens"] == 16
    events = post_stream(srv.http, "/v1/completions", {**body, "stream": True})
    texts = {0: "", 1: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
    assert [texts[0], texts[1]] == [o.text for o in expected.outputs]


def test_completion_logprobs(srv, ref):
    body = {"model": "tiny", "prompt": "w40 w41 w42", "max_tokens": 6, "temperature": 0,
            "logprobs": 3, "ignore_eos": True}
    lp = srv.http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    expected = offline(ref, "w40 w41 w42", max_tokens=6, temperature=0, logprobs=3,
                       ignore_eos=True).outputs[0]
    assert (len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
            == len(lp["text_offset"]) == 6)
    for i, (token, position) in enumerate(zip(expected.token_ids, expected.logprobs)):
        assert lp["token_logprobs"][i] == pytest.approx(position[token].logprob, abs=1e-4)
        assert lp["tokens"][i] == position[token].decoded_token
        assert len(lp["top_logprobs"][i]) in (3, 4)
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(lp["token_logprobs"][i],
                                                                    abs=1e-6)  # greedy
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    events = post_stream(srv.http, "/v1/completions", {**body, "stream": True})
    streamed = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed == lp["tokens"]


def test_chat_logprobs(srv):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w7"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}
    content = srv.http.post("/v1/chat/completions",
                            json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for item in content:
        assert item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
        # greedy
        assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"], abs=1e-6)


def test_stop_string(srv, ref):
    full = offline(ref, "w50 w51", max_tokens=12, temperature=0, ignore_eos=True).outputs[0].text
    stop = full.split()[3]
    body = {"model": "tiny", "prompt": "w50 w51", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "stop": [stop]}
    choice = srv.http.post("/v1/completions", json=body).json()["choices"][0]
    assert choice["text"] == full[:full.index(stop)]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    events = post_stream(srv.http, "/v1/completions", {**body, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    wait_all_free(srv.engine)


# ---- the official client ----------------------------------------------------------

def test_openai_client(srv, ref):
    import openai

    client = openai.OpenAI(base_url=f"{srv.auth_url}/v1", api_key=API_KEY, max_retries=0)
    comp = client.completions.create(model="tiny", prompt="w60 w61", max_tokens=6, temperature=0,
                                     extra_body={"ignore_eos": True})
    expected = offline(ref, "w60 w61", max_tokens=6, temperature=0,
                       ignore_eos=True).outputs[0].text
    assert comp.choices[0].text == expected and comp.usage.completion_tokens == 6
    messages = [{"role": "system", "content": "w3"}, {"role": "user", "content": "w8 w9"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7,
                                          temperature=0, extra_body={"ignore_eos": True})
    expected_chat = offline(ref, {"prompt_token_ids": word_ids(1, 3, 1, 8, 9, 2)}, max_tokens=7,
                            temperature=0, ignore_eos=True).outputs[0].text
    assert chat.choices[0].message.content == expected_chat
    assert chat.usage.prompt_tokens == 6 and chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=7,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_chat
    assert chunks[-1].usage.completion_tokens == 7
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="w5", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="w5")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.auth_url}/v1", api_key="wrong", max_retries=0).models.list()
    wait_all_free(srv.engine)
