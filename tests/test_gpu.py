"""CUDA: the engine on a GPU equals HF transformers on the same device (greedy), through
prefix caching and preemption; `raylm serve --device cuda` answers the openai client; TP=2
over NCCL equals TP=1. Skipped without a CUDA GPU (and TP without two)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.distributed.communicator import free_port
from tests.conftest import hf_greedy, make_tiny_model, random_prompts
from tests.waiting import wait_for

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was a little",
         "The three primary colors are"]


def _run(llm, prompts, n):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_on_cuda_equals_hf_on_cuda(smollm2_path, smollm2_tokenizer, dtype):
    prompts = [smollm2_tokenizer.encode(t) for t in TEXTS]
    llm = LLM("smollm2-135m-instruct", dtype=dtype, device="cuda", num_blocks=256,
              max_model_len=512)
    assert llm.engine.core.executor.collective_rpc("device_info")[0][0].startswith("cuda")
    got = _run(llm, prompts, 20)
    want = hf_greedy(smollm2_path, prompts, 20, dtype=getattr(torch, dtype), device="cuda")
    if dtype == "float32":
        assert got == want
    else:  # bf16 GEMMs sum in another order than HF's: near-ties may flip late; the start may not
        assert [g[:8] for g in got] == [w[:8] for w in want], (got, want)


def test_prefix_hits_and_preemption_on_cuda_equal_hf(tiny_root):
    path = make_tiny_model(tiny_root, "llama")
    shared = random_prompts(1, seed=4, lo=48, hi=49)[0]
    prompts = [shared + tail for tail in random_prompts(4, seed=5, lo=3, hi=10)]
    want = hf_greedy(path, prompts, 24, device="cuda")
    cached = LLM(str(path), dtype="float32", device="cuda", num_blocks=64, max_model_len=256)
    first = _run(cached, prompts[:1], 24)
    rest = cached.generate([{"prompt_token_ids": p} for p in prompts[1:]],
                           SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                           use_tqdm=False)
    assert first + [o.outputs[0].token_ids for o in rest] == want
    assert all(o.num_cached_tokens == 48 for o in rest)
    tight = LLM(str(path), dtype="float32", device="cuda", num_blocks=16, block_size=8,
                max_model_len=128)
    long_prompts = random_prompts(6, seed=3, lo=20, hi=40)
    assert _run(tight, long_prompts, 24) == hf_greedy(path, long_prompts, 24, device="cuda")
    assert tight.engine.core.scheduler.num_preemptions > 0


def test_cuda_kv_cache_is_sized_from_gpu_memory(tiny_root):
    """No num_blocks: the budget comes from gpu_memory_utilization after a profiling forward."""
    import gc

    path, blocks = make_tiny_model(tiny_root, "llama"), []
    # one at a time: a live engine's cache counts as this process's use
    for utilization in (0.3, 0.5):
        llm = LLM(str(path), dtype="float32", device="cuda", gpu_memory_utilization=utilization,
                  max_model_len=256)
        blocks.append(llm.engine.core.num_blocks)
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    assert 1.4 < blocks[1] / blocks[0] < 1.9, blocks


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="TP=2 over NCCL needs two GPUs")
def test_tp2_over_nccl_equals_tp1(tiny_root):
    path = make_tiny_model(tiny_root, "llama")
    prompts = random_prompts(4, seed=7)
    one = _run(LLM(str(path), dtype="float32", device="cuda", num_blocks=64, max_model_len=256),
               prompts, 16)
    two = LLM(str(path), dtype="float32", device="cuda", num_blocks=64, max_model_len=256,
              tensor_parallel_size=2)
    try:
        assert _run(two, prompts, 16) == one
    finally:
        two.shutdown()


def test_raylm_serve_on_cuda_answers_the_openai_client(tmp_path):
    import httpx
    import openai

    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a local cluster without token auth, as in the CPU tests
    env.setdefault("RAY_AUTH_MODE", "disabled")
    cmd = [sys.executable, "-m", "raylm.cli", "serve", "--device", "cuda", "--port", str(port),
           "--max-model-len", "512"]
    with open(tmp_path / "serve.log", "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 300, "raylm serve --device cuda healthy", 1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=16,
                                               temperature=0,
                                               messages=[{"role": "user",
                                                          "content": "What is 2+2?"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(90)


def _smollm2(backend, fused_ops, enforce_eager, dtype="float32"):
    return LLM("smollm2-135m-instruct", dtype=dtype, device="cuda", num_blocks=256,
               max_model_len=512, attention_backend=backend, fused_ops=fused_ops,
               enforce_eager=enforce_eager)


def test_smollm2_triton_and_decode_graphs_equal_the_torch_backend(smollm2_tokenizer):
    """fp32: the Triton attention, fused ops and decode graphs give the torch path's tokens;
    graphs on and off give the same logprobs (the same kernels, replayed)."""
    import gc

    prompts = [smollm2_tokenizer.encode(t) for t in TEXTS]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    results = {}
    for name, args in {"torch": ("torch", "torch", True), "eager": ("triton", "triton", True),
                       "graphs": ("triton", "triton", False)}.items():
        llm = _smollm2(*args)
        runner = llm.engine.core.executor.worker.runner
        assert (len(runner.graphs.graphs) > 0) if name == "graphs" else runner.graphs is None
        results[name] = [o.outputs[0]
                         for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                               params, use_tqdm=False)]
        llm.shutdown()
        del llm
        gc.collect()
    tokens = {name: [o.token_ids for o in outs] for name, outs in results.items()}
    assert tokens["graphs"] == tokens["eager"] == tokens["torch"]
    for g, e in zip(results["graphs"], results["eager"]):
        assert [lp[t].logprob for lp, t in zip(g.logprobs, g.token_ids)] == \
            pytest.approx([lp[t].logprob for lp, t in zip(e.logprobs, e.token_ids)], abs=1e-4)


def test_moe_with_triton_and_graphs_on_cuda_equals_hf(tiny_root):
    path = make_tiny_model(tiny_root, "mixtral")
    prompts = random_prompts(6, seed=12)
    llm = LLM(str(path), dtype="float32", device="cuda", num_blocks=64, max_model_len=256)
    assert len(llm.engine.core.executor.worker.runner.graphs.graphs) > 0  # auto: triton + graphs
    assert _run(llm, prompts, 16) == hf_greedy(path, prompts, 16, device="cuda")
