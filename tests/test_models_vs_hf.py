"""Greedy fp32 outputs equal HF transformers token for token, across model families and
through every scheduler path: batching, chunked prefill, preemption, prefix-cache hits;
with each attention backend that runs on the CPU (the `torch` reference and `cpu`, the
compiled decode kernel, and `triton` with the Triton fused ops, under Triton's interpreter)."""
from __future__ import annotations

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.kernels import cpu_paged_attention
from raylm.kernels.triton_support import triton_runs_on
from tests.conftest import assert_all_free, hf_greedy, make_tiny_model, random_prompts

MAX_NEW = 12


def _greedy(n=MAX_NEW):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _run(llm, prompts, n=MAX_NEW):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(n), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend(request):
    if request.param == "cpu" and not cpu_paged_attention.available():
        pytest.skip("the cpu backend's kernel needs a C compiler")
    if request.param == "triton" and not triton_runs_on(torch.device("cpu")):
        pytest.skip("Triton is not installed")
    return request.param


def engine_kw(backend):
    """torch: the references all the way. cpu: the C kernels (attention and the fused ops).
    triton: every Triton kernel (under the interpreter here): this is what proves its
    metadata, block tables and slots are right."""
    return dict(attention_backend=backend,
                fused_ops={"torch": "torch", "cpu": "auto"}.get(backend, backend))


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(6, seed=1)


def test_batch_equals_hf(tiny_model, prompts, backend):
    """Every family (Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE), batched, equals HF."""
    llm = LLM(str(tiny_model), dtype="float32", num_blocks=64, max_model_len=256,
              **engine_kw(backend))
    assert llm.engine.core.executor.collective_rpc("device_info") == [("cpu", backend)]
    assert _run(llm, prompts) == hf_greedy(tiny_model, prompts, MAX_NEW)
    assert_all_free(llm)


def test_mixed_batch_equals_one_by_one(tiny_llama, prompts):
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=256)
    batched = _run(llm, prompts)
    single = [_run(llm, [p])[0] for p in prompts]
    assert batched == single
    assert_all_free(llm)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_chunked_prefill_equals_hf(tiny_root, kind, backend):
    """Tiny token budget: long prompts are prefilled in chunks, mixed with decodes."""
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(4, seed=2, lo=40, hi=90)
    llm = LLM(str(path), dtype="float32", num_blocks=64, max_model_len=256,
              max_num_batched_tokens=16, long_prefill_token_threshold=16, **engine_kw(backend))
    assert _run(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)
    assert_all_free(llm)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_preemption_equals_plain(tiny_root, kind, backend):
    """A KV cache too small for the batch forces preemption by recompute; tokens unchanged
    (and equal HF's)."""
    if backend == "triton" and kind == "mixtral":
        pytest.skip("interpreted Triton is slow: the MoE kernels' paths are the other tests'")
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(6, seed=3, lo=20, hi=40)
    tight = LLM(str(path), dtype="float32", num_blocks=16, block_size=8, max_model_len=128,
                **engine_kw(backend))
    assert _run(tight, prompts, 24) == hf_greedy(path, prompts, 24)
    assert tight.engine.core.scheduler.num_preemptions > 0, "the test did not force a preemption"
    assert_all_free(tight)


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_prefix_cache_hits_equal_hf(tiny_root, kind, backend):
    path = make_tiny_model(tiny_root, kind)
    shared = random_prompts(1, seed=4, lo=48, hi=49)[0]
    prompts = [shared + tail for tail in random_prompts(4, seed=5, lo=3, hi=10)]
    expected = hf_greedy(path, prompts, MAX_NEW)
    cached = LLM(str(path), dtype="float32", num_blocks=64, max_model_len=256, block_size=16,
                 **engine_kw(backend))
    first = _run(cached, prompts[:1])
    rest = cached.generate([{"prompt_token_ids": p} for p in prompts[1:]], _greedy(),
                           use_tqdm=False)
    assert first + [o.outputs[0].token_ids for o in rest] == expected
    assert all(o.num_cached_tokens == 48 for o in rest), [o.num_cached_tokens for o in rest]
    assert_all_free(cached)


def test_n_samples_and_seed(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=64, max_model_len=256)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    a = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    b = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0]
    assert [o.index for o in a.outputs] == [0, 1, 2]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids)
                for o in a.outputs}) > 1, "n samples with one seed should differ"
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in a.outputs)
    assert_all_free(llm)


@pytest.mark.slow
def test_smollm2_equals_hf(smollm2_path, smollm2_tokenizer):
    texts = ["The capital of France is", "def fibonacci(n):",
             "Once upon a time, there was a little", "The three primary colors are"]
    prompts = [smollm2_tokenizer.encode(t) for t in texts]
    llm = LLM("smollm2-135m-instruct", dtype="float32", num_blocks=256, max_model_len=512)
    assert _run(llm, prompts, 20) == hf_greedy(smollm2_path, prompts, 20)
    assert_all_free(llm)
