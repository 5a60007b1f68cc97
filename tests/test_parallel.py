"""Tensor and pipeline parallelism through the Ray executor: greedy fp32 outputs equal HF
transformers (and so TP=1) token for token, for dense and MoE models, with TP=2, PP=2 and
TP=2 x PP=2; a dead worker fails the engine fast with a clear error."""
from __future__ import annotations

import pytest

from raylm import LLM, SamplingParams
from tests.conftest import assert_all_free, hf_greedy, make_tiny_model, random_prompts

pytestmark = pytest.mark.slow

MAX_NEW = 10


@pytest.fixture(scope="module", autouse=True)
def ray_cluster(ray_session):
    yield ray_session


def _llm(path, tp, pp, **kw):
    return LLM(str(path), dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp,
               worker_num_cpus=1, **{"num_blocks": 64, "max_model_len": 256, **kw})


def _greedy(llm, prompts, n=MAX_NEW):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids
            for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                  use_tqdm=False)]


@pytest.mark.parametrize("kind, tp, pp, comm", [
    ("llama", 2, 1, "shm"), ("llama", 1, 2, "shm"), ("llama", 2, 2, "shm"),
    ("llama", 2, 2, "gloo"), ("mixtral", 2, 1, "shm"), ("mixtral", 1, 2, "shm"),
    # 3 layers over 2 stages, LM head tied to the first stage's embedding
    ("qwen3_moe", 2, 2, "shm"), ("llama_tied3", 1, 2, "shm"),
])
def test_parallel_equals_hf(tiny_root, kind, tp, pp, comm):
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(6, seed=11)
    llm = _llm(path, tp, pp, cpu_communicator=comm)
    try:
        assert _greedy(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)
        assert_all_free(llm)
        if pp > 1:  # several requests: the pipeline must have held pp batches at once
            assert llm.engine.core.peak_batches_in_flight == pp
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kind, pp, placement", [
    ("mixtral", 1, None),  # contiguous: experts 0-1 on rank 0, 2-3 on rank 1
    ("qwen3_moe", 2, [1, 0, 1, 1]),  # an uneven table, with pipeline stages as well
])
def test_expert_parallel_equals_hf(tiny_root, kind, pp, placement):
    """EP over the 2 TP ranks: each holds whole experts (only its own read from disk)."""
    path = make_tiny_model(tiny_root, kind)
    prompts = random_prompts(6, seed=12)
    llm = _llm(path, 2, pp, enable_expert_parallel=True, expert_placement=placement)
    try:
        held = llm.engine.core.executor.collective_rpc("local_experts")  # per global rank
        table = placement or [0, 0, 1, 1]
        for rank, layers in enumerate(held):
            assert layers and all(ids == [e for e, r in enumerate(table) if r == rank % 2]
                                  for ids in layers.values())
        assert _greedy(llm, prompts) == hf_greedy(path, prompts, MAX_NEW)
        assert_all_free(llm)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs, match", [
    (dict(tensor_parallel_size=2, enable_expert_parallel=True, expert_placement=[0, 0, 0, 0]),
     "every EP rank"),
    (dict(tensor_parallel_size=2, expert_placement=[0, 1, 0, 1]), "enable_expert_parallel"),
])
def test_bad_expert_placement_is_a_clear_error(kwargs, match):
    from raylm.llm import build_engine_config

    with pytest.raises(ValueError, match=match):
        build_engine_config(model="m", **kwargs)


def test_pipeline_preemption_and_chunked_prefill_equal_plain(tiny_root):
    """PP=2 with a KV cache too small for the batch and a tiny token budget: preemption
    and chunked prefill with two batches in flight still give the plain tokens."""
    path = make_tiny_model(tiny_root, "llama")
    prompts = random_prompts(6, seed=3, lo=20, hi=40)
    expected = hf_greedy(path, prompts, 24)
    llm = _llm(path, 1, 2, num_blocks=16, block_size=8, max_model_len=128,
               max_num_batched_tokens=32, long_prefill_token_threshold=16)
    try:
        assert _greedy(llm, prompts, 24) == expected
        assert llm.engine.core.scheduler.num_preemptions > 0, "the test did not force a preemption"
        assert_all_free(llm)
    finally:
        llm.shutdown()


@pytest.mark.timeout(120)
def test_dead_worker_fails_fast_with_a_clear_error(tiny_root):
    import ray

    from raylm.executor.ray_executor import WorkerDiedError

    llm = _llm(make_tiny_model(tiny_root, "llama"), 2, 1)
    executor = llm.engine.core.executor
    ray.kill(executor.workers[1])
    with pytest.raises(WorkerDiedError, match="worker rank 1"):
        _greedy(llm, random_prompts(2, seed=5))
    assert executor.workers == []  # the survivors were killed too: nothing left blocked in gloo


@pytest.mark.timeout(120)
def test_stuck_worker_fails_the_step_after_step_timeout(tiny_root):
    """Watchdog: a worker that is alive but never answers (SIGSTOP) fails the step after
    step_timeout_s with an error naming it, instead of hanging the engine."""
    import os
    import signal

    import ray

    from raylm.executor.ray_executor import WorkerDiedError

    llm = _llm(make_tiny_model(tiny_root, "llama"), 2, 1, step_timeout_s=3)
    executor = llm.engine.core.executor
    pid = ray.get(executor.workers[1].pid.remote())
    os.kill(pid, signal.SIGSTOP)
    try:  # (a hang, not this error, would run into the test's 120 s timeout)
        with pytest.raises(WorkerDiedError, match=r"\[0, 1\] did not answer within 3 s \(stuck\)"):
            _greedy(llm, random_prompts(2, seed=5))
    finally:
        os.kill(pid, signal.SIGCONT)  # ray.kill has already been sent; let it land
    assert executor.workers == []


def test_nccl_communicator_is_rejected_cleanly_on_cpu():
    import torch

    from raylm.distributed import nccl_communicator  # importable without cupy or a GPU
    from raylm.distributed.communicator import create_communicator

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu-marked tests cover NCCL")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        create_communicator("cuda", [0, 1])
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        nccl_communicator.NcclCommunicator([0, 1], group=None)
    with pytest.raises(ValueError, match="device"):
        create_communicator("tpu", [0, 1])
    with pytest.raises(RuntimeError, match="CUDA GPU"):  # the DP group's, for EP across replicas
        nccl_communicator.NcclCommunicator.over_store(store=None, key="k", rank=0, size=2)
