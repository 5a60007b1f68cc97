"""Decode graphs: the bucket sizes, and the padded-bucket decode path (live rows copied into
static buffers, padding rows that store nothing, the first n rows of the output taken)
equal to HF transformers. On CPU the path runs eagerly under Triton's interpreter (graph
capture itself needs CUDA: tests/test_gpu.py compares graphs on and off there)."""
from __future__ import annotations

import pytest
import torch

from raylm import LLM, SamplingParams
from raylm.executor.cuda_graphs import capture_sizes
from raylm.kernels.triton_support import triton_runs_on
from tests.conftest import assert_all_free, hf_greedy, make_tiny_model, random_prompts


def test_capture_sizes_are_powers_then_steps_of_eight():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(128) == [1, 2, 4] + list(range(8, 129, 8))


def test_graphs_need_the_triton_path(tiny_llama):
    """The reference attention and MoE sync with the host mid-step: no graphs for them."""
    llm = LLM(str(tiny_llama), dtype="float32", num_blocks=16, max_model_len=64)
    runner = llm.engine.core.executor.worker.runner
    assert not runner.graphs_supported() and runner.capture_graphs(capture=False) == 0
    assert runner.graphs is None


@pytest.mark.skipif(not triton_runs_on(torch.device("cpu")), reason="Triton is not installed")
@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_padded_decode_buckets_equal_hf(tiny_root, kind):
    """Six prompts of different lengths and budgets: decode batches of 6 down to 1 run in
    buckets 8, 4, 2, 1 (mostly padded). Tokens equal HF's, and every logprob equals the same
    engine's without the bucket path (a padding row that wrote to the cache would show)."""
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(6, seed=11)
    budgets = [3, 5, 7, 9, 11, 13]
    llm = LLM(str(path), dtype="float32", num_blocks=64, max_model_len=128, max_num_seqs=8,
              attention_backend="triton", fused_ops="triton", enable_prefix_caching=False)
    runner = llm.engine.core.executor.worker.runner
    assert runner.graphs is None  # no capture on CPU
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
              for n in budgets]
    requests = [{"prompt_token_ids": p} for p in prompts]
    assert runner.capture_graphs(capture=False) == 0 and runner.graphs.sizes == [1, 2, 4, 8]
    sizes, run = [], runner.graphs.run
    runner.graphs.run = (lambda step, forward: sizes.append(step.meta.num_decodes)
                         or run(step, forward))
    # padded first, on a fresh pool: block 0 (where a bad padding row would write) is in use
    padded = [o.outputs[0] for o in llm.generate(requests, params, use_tqdm=False)]
    runner.graphs = None
    plain = [o.outputs[0] for o in llm.generate(requests, params, use_tqdm=False)]
    assert {6, 5, 3, 1} <= set(sizes), sizes  # padded to 8, 8, 4, 1
    for got, ref, n, want in zip(padded, plain, budgets,
                                 [hf_greedy(path, [p], 13)[0] for p in prompts]):
        assert got.token_ids == ref.token_ids == want[:n]
        got_lp = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        ref_lp = [lp[t].logprob for lp, t in zip(ref.logprobs, ref.token_ids)]
        assert got_lp == pytest.approx(ref_lp, abs=1e-5)
    assert_all_free(llm)
