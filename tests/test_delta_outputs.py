"""Delta streams (output_kind="delta"): what crosses the Serve boundary. Folding the deltas
back must give exactly the cumulative stream's final output (tokens, text, logprobs), for
n > 1 and stop strings too; and the engine's warmup leaves nothing behind."""
import asyncio

import pytest

from raylm.config import CacheConfig, EngineConfig, ModelConfig
from raylm.engine.async_engine import AsyncEngine
from raylm.outputs import CompletionOutput, DeltaState, RequestOutput, delta_output, merge_delta
from raylm.sampling_params import SamplingParams
from tests.conftest import hf_greedy


def _engine(path):
    return AsyncEngine(EngineConfig(model=ModelConfig(model=str(path), dtype="float32",
                                                      max_model_len=128),
                                    cache=CacheConfig(num_blocks=32)))


async def _collect(engine, params, rid, prompt=(5, 6, 7, 8)):
    return [o async for o in engine.generate({"prompt_token_ids": list(prompt)}, params, rid)]


@pytest.mark.parametrize("params", [
    dict(temperature=0, max_tokens=9, ignore_eos=True),
    dict(temperature=1.0, seed=7, n=3, max_tokens=7, ignore_eos=True, logprobs=2),
    # this model's greedy text repeats " w398": the stop string ends it mid-stream, cutting
    # held-back text
    dict(temperature=0, max_tokens=12, ignore_eos=True, stop=["w398 w398"]),
])
def test_deltas_fold_to_the_cumulative_result(tiny_llama, params):
    engine = _engine(tiny_llama)

    async def main():
        cumulative = await _collect(engine, SamplingParams(**params), "c")
        deltas = await _collect(engine, SamplingParams(**params, output_kind="delta"), "d")
        return cumulative[-1], deltas

    final, deltas = asyncio.run(main())
    if params["temperature"] == 0 and not params.get("stop"):  # the cumulative run itself == HF
        assert final.outputs[0].token_ids == hf_greedy(tiny_llama, [[5, 6, 7, 8]],
                                                       params["max_tokens"])[0]
    if params.get("stop"):
        assert (final.outputs[0].finish_reason == "stop"
                and "w398 w398" not in final.outputs[0].text)
    acc = None
    for d in deltas:
        acc = merge_delta(acc, d)
    assert acc.finished and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    assert acc.prompt_token_ids == final.prompt_token_ids == [5, 6, 7, 8]
    assert all(d.prompt_token_ids == [] for d in deltas[1:])  # the prompt goes out once
    for got, want in zip(acc.outputs, final.outputs, strict=True):
        assert (got.index, got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
               (want.index, want.token_ids, want.text, want.finish_reason, want.stop_reason)
        assert got.logprobs == want.logprobs and got.cumulative_logprob == want.cumulative_logprob
    # a delta carries only new tokens: the sizes add up exactly
    sizes = sum(len(c.token_ids) for d in deltas for c in d.outputs)
    assert sizes == sum(len(c.token_ids) for c in final.outputs)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_delta_output_by_hand():
    c = CompletionOutput(0, "ab", [1, 2], None, None)
    out = RequestOutput("r", "p", [9], [c])
    state = DeltaState()
    first = delta_output(out, state)
    assert (first.outputs[0].token_ids == [1, 2] and first.outputs[0].text == "ab"
            and first.prompt_token_ids == [9])
    assert delta_output(out, state) is None  # nothing new
    c.token_ids.append(3)  # a token with no visible text yet (held back) still goes out
    second = delta_output(out, state)
    assert (second.outputs[0].token_ids == [3] and second.outputs[0].text == ""
            and second.prompt_token_ids == [])
    c.text, c.finish_reason, out.finished = "abc", "stop", True
    last = delta_output(out, state)
    assert (last.outputs[0].text == "c" and last.outputs[0].finish_reason == "stop"
            and last.finished)
    assert merge_delta(merge_delta(merge_delta(None, first), second),
                       last).outputs[0].text == "abc"


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="final")


def test_warmup_leaves_the_engine_idle(tiny_llama):
    engine = _engine(tiny_llama)
    engine.engine.warmup()
    stats = engine.stats()
    assert (stats.num_free_blocks == stats.num_blocks
            and not engine.engine.has_unfinished_requests())

    async def busy():
        gen = engine.generate({"prompt_token_ids": [5, 6]},
                              SamplingParams(max_tokens=50, ignore_eos=True), "x")
        await gen.__anext__()
        with pytest.raises(RuntimeError, match="idle"):
            engine.engine.warmup()
        await gen.aclose()

    asyncio.run(busy())
