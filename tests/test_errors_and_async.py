"""Bad input gets a ValueError naming what is wrong, and leaves no blocks behind;
the AsyncEngine streams, aborts and frees."""
from __future__ import annotations

import asyncio

import pytest

from raylm import LLM, SamplingParams
from raylm.config import EngineConfig, ModelConfig, CacheConfig
from raylm.engine.async_engine import AsyncEngine
from tests.conftest import assert_all_free, hf_greedy
from tests.waiting import async_wait_for


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", num_blocks=32, max_model_len=64)


@pytest.mark.parametrize("prompt, params, field", [
    ({"prompt_token_ids": []}, {}, "prompt"),
    ("", {}, "prompt"),
    ({"prompt_token_ids": list(range(3, 70))}, {}, "max_model_len"),
    ({"prompt_token_ids": [3, 99999]}, {}, "vocabulary"),
    (3.5, {}, "prompt"),
])
def test_bad_prompt(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(prompt, SamplingParams(**params), use_tqdm=False)
    assert_all_free(llm)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n"), ({"logprobs": 50}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_batch_leaves_nothing_behind(llm):
    """The second prompt is bad: the first must not stay queued in the engine."""
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert_all_free(llm)
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kwargs, field", [
    ({"model": "/no/such/dir"}, "model"), ({"dtype": "int7"}, "dtype"),
    ({"block_size": 0}, "block_size"), ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_engine_options(tiny_llama, kwargs, field):
    kwargs = {"model": str(tiny_llama), **kwargs}
    with pytest.raises(ValueError, match=field):
        LLM(**kwargs)


def test_kv_cache_smaller_than_max_model_len(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama), num_blocks=2, block_size=16, max_model_len=64)


def _async_engine(path):
    return AsyncEngine(EngineConfig(model=ModelConfig(model=str(path), dtype="float32",
                                                      max_model_len=128),
                                    cache=CacheConfig(num_blocks=32)))


def test_async_stream_equals_hf_and_abort_frees(tiny_llama):
    engine = _async_engine(tiny_llama)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    expected = hf_greedy(tiny_llama, prompts, 8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def collect(i, prompt):
        last = None
        async for out in engine.generate({"prompt_token_ids": prompt}, params, f"r{i}"):
            assert len(out.outputs[0].token_ids) >= (len(last.outputs[0].token_ids) if last else 0)
            last = out
        return last.outputs[0].token_ids

    async def abort_midway():
        gen = engine.generate({"prompt_token_ids": [5, 6]},
                              SamplingParams(max_tokens=100, ignore_eos=True), "x")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()
        stats = engine.stats
        await async_wait_for(lambda: stats().num_free_blocks == stats().num_blocks, 10,
                             "the abort landing between steps (every block free)", 0.01)

    async def main():
        got = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))
        await abort_midway()
        return got

    assert asyncio.run(main()) == expected
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


def test_async_bad_request_raises_in_caller(tiny_llama):
    engine = _async_engine(tiny_llama)

    async def main():
        with pytest.raises(ValueError, match="prompt"):
            async for _ in engine.generate({"prompt_token_ids": []}, SamplingParams(), "bad"):
                pass
        outs = [o async
                for o in engine.generate({"prompt_token_ids": [4, 5]},
                                         SamplingParams(max_tokens=2), "ok")]
        return outs[-1]

    assert asyncio.run(main()).finished
