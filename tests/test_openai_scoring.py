"""Scoring and biasing over HTTP (issue 20): completions' echo + logprobs (the prompt's
logprobs first, its first token's null; max_tokens 0 scores the prompt alone, as evaluation
harnesses ask), vLLM's `prompt_logprobs` on both endpoints, and logit_bias, against the
offline `LLM` on the same weights and through the official openai client."""
from __future__ import annotations

import pytest

from raylm import LLM, SamplingParams
from tests.openai_server import (API_KEY, post_stream, srv, wait_all_free,
                                 word_ids)  # noqa: F401 (srv: fixture)

PROMPT = "w5 w6 w7 w8 w9 w10"
PROMPT_IDS = word_ids(5, 6, 7, 8, 9, 10)  # the tiny tokenizer adds no BOS


@pytest.fixture(scope="module")
def ref(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", max_model_len=128, num_blocks=64)


@pytest.fixture(scope="module")
def scored(ref):
    """The offline engine's prompt logprobs (top 2) and greedy continuation with logprobs."""
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2,
                            ignore_eos=True)
    return ref.generate({"prompt_token_ids": PROMPT_IDS}, params, use_tqdm=False)[0]


def _expected(scored, tokenizer, generated: int):
    """OpenAI's legacy logprobs lists for the prompt and the first `generated` tokens."""
    positions = scored.prompt_logprobs[1:] + scored.outputs[0].logprobs[:generated]
    ids = PROMPT_IDS[1:] + scored.outputs[0].token_ids[:generated]
    tokens = [tokenizer.decode([PROMPT_IDS[0]])] + [tokenizer.decode([t]) for t in ids]
    values = [None] + [p[t].logprob for p, t in zip(positions, ids)]
    tops = [None] + [{lp.decoded_token: lp.logprob
                      for lp in sorted(p.values(), key=lambda lp: lp.rank)}
                     for p in positions]
    return tokens, values, tops


def _assert_logprobs(got, expected) -> None:
    tokens, values, tops = expected
    assert got["tokens"] == tokens
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(values[1:], abs=1e-4)
    for g, e in zip(got["top_logprobs"][1:], tops[1:]):
        assert g == pytest.approx(e, abs=1e-4)
    assert got["text_offset"] == sorted(got["text_offset"]) and got["text_offset"][0] == 0


@pytest.mark.parametrize("max_tokens", [0, 2])
def test_echo_logprobs_include_the_prompt(srv, ref, scored, max_tokens):
    body = {"model": "tiny", "prompt": PROMPT, "echo": True, "logprobs": 2,
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    r = srv.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["text"] == ref.get_tokenizer().decode(PROMPT_IDS
                                                        + scored.outputs[0].token_ids[:max_tokens])
    _assert_logprobs(choice["logprobs"], _expected(scored, ref.get_tokenizer(), max_tokens))
    assert usage == {"prompt_tokens": 6, "completion_tokens": max_tokens,
                     "total_tokens": 6 + max_tokens}
    assert choice["finish_reason"] == "length"
    events = post_stream(srv.http, "/v1/completions", {**body, "stream": True})
    streamed = {k: [x for e in events[:-1] for x in e["choices"][0]["logprobs"][k]]
                for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    assert streamed == choice["logprobs"]
    wait_all_free(srv.engine)


def test_vllm_prompt_logprobs_field(srv, scored):
    r = srv.http.post("/v1/completions",
                      json={"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 1,
                            "prompt_logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["prompt_logprobs"]
    assert len(got) == 6 and got[0] is None
    for entry, position in zip(got[1:], scored.prompt_logprobs[1:]):
        assert {int(k) for k in entry} == set(position)
        for k, v in entry.items():
            lp = position[int(k)]
            assert v["logprob"] == pytest.approx(lp.logprob, abs=1e-4)
            assert (v["rank"], v["decoded_token"]) == (lp.rank, lp.decoded_token)
    chat = srv.http.post("/v1/chat/completions",
                         json={"model": "tiny", "max_tokens": 1, "prompt_logprobs": 0,
                               "messages": [{"role": "user",
                                             "content": "w5 w6"}]})
    assert chat.status_code == 200, chat.text
    got = chat.json()["prompt_logprobs"]  # the templated prompt "w1 w5 w6 w2"
    assert len(got) == 4 and got[0] is None
    assert [int(next(iter(e))) for e in got[1:]] == word_ids(5, 6, 2)
    wait_all_free(srv.engine)


def test_logit_bias_over_http(srv, scored):
    greedy = scored.outputs[0].token_ids[0]
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True}
    banned = srv.http.post("/v1/completions",
                           json={**body, "logit_bias": {str(greedy): -100}}).json()
    forced = srv.http.post("/v1/completions", json={**body, "logit_bias": {"42": 100}}).json()
    first = srv.http.post("/tokenize", json={"prompt": banned["choices"][0]["text"],
                                             "add_special_tokens": False}).json()["tokens"][0]
    assert first != greedy
    assert forced["choices"][0]["text"] == " w39" * 3  # token 42 is word w39
    wait_all_free(srv.engine)


def test_openai_client_scores_a_prompt(srv, scored, ref):
    """lm-evaluation-harness's log-likelihood request: echo, logprobs, max_tokens 0."""
    import openai

    client = openai.OpenAI(base_url=f"{srv.auth_url}/v1", api_key=API_KEY, max_retries=0)
    comp = client.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=2,
                                     max_tokens=0, temperature=0)
    lp = comp.choices[0].logprobs
    assert comp.choices[0].text == PROMPT and comp.usage.completion_tokens == 0
    tokens, values, _ = _expected(scored, ref.get_tokenizer(), 0)
    assert lp.tokens == tokens and lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(values[1:], abs=1e-4)
    chat = client.chat.completions.create(model="tiny",
                                          messages=[{"role": "user", "content": "w5"}],
                                          max_tokens=2, temperature=0, logit_bias={"42": 100})
    assert chat.choices[0].message.content == " w39" * 2
    wait_all_free(srv.engine)
