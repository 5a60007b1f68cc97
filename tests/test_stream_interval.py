"""The stream interval (`stream_interval`, `--stream-interval`): a request's update goes out at
its first token, at its end, and otherwise every `stream_interval` tokens. The tokens, text,
logprobs and finish are those of the every-token stream (and of HF greedy); only how they are
grouped changes. Checked on the engine's cumulative and delta streams, and over HTTP."""
import asyncio

import pytest

from raylm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from raylm.engine.async_engine import AsyncEngine
from raylm.outputs import merge_delta
from raylm.sampling_params import SamplingParams
from tests.conftest import hf_greedy
from tests.openai_server import serving, whole_and_stream


def _config(path, interval):
    return EngineConfig(model=ModelConfig(model=str(path), dtype="float32", max_model_len=128),
                        cache=CacheConfig(num_blocks=64),
                        scheduler=SchedulerConfig(stream_interval=interval))


@pytest.fixture
def make_engine(tiny_llama):
    """AsyncEngines with a given stream interval, shut down after the test."""
    engines = []

    def make(interval):
        engines.append(AsyncEngine(_config(tiny_llama, interval)))
        return engines[-1]
    yield make
    for engine in engines:
        engine.shutdown()


def _stream(engine, params, rid, prompt=(5, 6, 7, 8), sizes=None):
    """Every update of one request; `sizes` gets the token count of sample 0 at each update
    (a cumulative update is one object the engine keeps growing)."""
    async def collect():
        outs = []
        async for o in engine.generate({"prompt_token_ids": list(prompt)}, params, rid):
            outs.append(o)
            if sizes is not None:
                sizes.append((len(o.outputs[0].token_ids), o.finished))
        return outs
    return asyncio.run(collect())


@pytest.mark.parametrize("max_tokens, sizes", [(9, [1, 5, 9]), (10, [1, 5, 9, 10]), (1, [1])])
def test_updates_come_at_the_first_token_every_interval_and_the_end(tiny_llama, make_engine,
                                                                    max_tokens, sizes):
    engine = make_engine(4)
    seen = []
    outs = _stream(engine, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                   "a", sizes=seen)
    # hand-counted: the first token, then every 4, then the end
    assert seen == [(n, False) for n in sizes[:-1]] + [(sizes[-1], True)]
    want = hf_greedy(tiny_llama, [[5, 6, 7, 8]], max_tokens)[0]
    assert outs[-1].outputs[0].token_ids == want


@pytest.mark.parametrize("params", [
    dict(temperature=0, max_tokens=11, ignore_eos=True, logprobs=2),
    dict(temperature=1.0, seed=7, n=3, max_tokens=7, ignore_eos=True, logprobs=1),
    # the greedy text repeats " w398": the stop string ends it between two updates
    dict(temperature=0, max_tokens=12, ignore_eos=True, stop=["w398 w398"]),
])
def test_grouped_stream_equals_the_every_token_stream(make_engine, params):
    every = _stream(make_engine(1), SamplingParams(**params), "a")
    grouped_engine = make_engine(3)
    grouped = _stream(grouped_engine, SamplingParams(**params), "b")
    deltas = _stream(grouped_engine, SamplingParams(**params, output_kind="delta"), "c")
    assert len(grouped) < len(every)
    folded = None
    for d in deltas:
        folded = merge_delta(folded, d)
    for got in (grouped[-1], folded):
        for g, w in zip(got.outputs, every[-1].outputs, strict=True):
            assert (g.token_ids, g.text, g.finish_reason, g.stop_reason, g.logprobs) == \
                   (w.token_ids, w.text, w.finish_reason, w.stop_reason, w.logprobs)
    stats = grouped_engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_stream_interval_is_validated():
    with pytest.raises(ValueError, match="stream_interval"):
        SchedulerConfig(stream_interval=0)


@pytest.fixture(scope="module")
def srv4(tiny_llama):
    yield from serving(_config(tiny_llama, 4), "tiny", [], None)


def test_http_stream_groups_tokens_and_equals_the_whole_response(srv4):
    body = {"model": "tiny", "prompt": "w20 w21 w22", "max_tokens": 10, "temperature": 0,
            "ignore_eos": True}
    whole, chunks, usage = whole_and_stream(srv4.http, "/v1/completions", body)
    assert usage["usage"] == whole["usage"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    # one word per token in this vocabulary: chunks of 1, 4, 4 and 1 tokens
    assert [len(c["choices"][0]["text"].split()) for c in chunks] == [1, 4, 4, 1]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 3 + ["length"]
