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

from raylm.distributed.communicator import free_port
from tests.conftest import hf_greedy, make_tiny_model, random_prompts
from tests.serve_load import (ADMIN, ADMIN_KEY, SteadyLoad, cluster_full, complete, continuation,
                              is_scaling, scale)
from tests.waiting import async_wait_for, wait_for

pytestmark = pytest.mark.slow

MAX_NEW = 8


@pytest.fixture(scope="module")
def app(tiny_root, ray_session):
    from ray import serve

    from raylm.deployments.openai import run_app

    path = make_tiny_model(tiny_root, "qwen3_moe")
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_app({"model": str(path), "served_model_name": "tiny", "dtype": "float32", "dp": 2,
             "enable_expert_parallel": True, "num_cpus_per_replica": 0.5, "max_model_len": 512,
             "num_blocks": 128, "admin_api_key": ADMIN_KEY})
    yield path, f"http://127.0.0.1:{port}"
    serve.shutdown()


def _coordinator():
    import ray
    from ray.serve._private.constants import SERVE_NAMESPACE

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "dp_coordinator" in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace=SERVE_NAMESPACE)


def _table():
    import ray

    _, table = ray.get(_coordinator().snapshot.remote(-1, 0.0))
    return sorted(table.values(), key=lambda s: s["dp_rank"])


def _control():
    import ray

    return ray.get(_coordinator().control.remote())


def test_dp2_ep_over_http_equals_hf(app):
    path, url = app
    prompts = random_prompts(6, seed=51)
    expected = [continuation(path, p, o)
                for p, o in zip(prompts, hf_greedy(path, prompts, MAX_NEW))]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[complete(client, url, p, MAX_NEW, rank=i % 2)
                                          for i, p in enumerate(prompts)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    table = _table()
    assert [s["dp_rank"] for s in table] == [0, 1]
    # each expert on one replica
    assert sorted(e for s in table for e in s["dp_experts"]) == [0, 1, 2, 3]
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
    expected = [continuation(path, p, o)
                for p, o in zip(prompts, hf_greedy(path, prompts, max_new))]
    before = {s["dp_rank"]: s for s in _table()}
    waves_before = _control()["waves_completed"]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            first = await asyncio.gather(*[complete(client, url, p, max_new, rank=0)
                                           for p in prompts[:2]])
            second = await asyncio.gather(*[complete(client, url, p, max_new, rank=0)
                                            for p in prompts[2:]])
            return first + second

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
    def wave_over():  # every rank has reported since the wave ended
        return not _control()["running"] and not any(s["dp_running"] for s in _table())

    wait_for(wave_over, 30, "the wave ending on every rank", detail=_table)
    after = {s["dp_rank"]: s for s in _table()}
    dummies = after[1]["dp_dummy_steps"] - before[1]["dp_dummy_steps"]
    assert (dummies >= 2 * max_new), (f"rank 1 ran {dummies} dummy steps for 2 x {max_new} steps "
                                      "of rank 0's work")
    # rank 0 had real work all along
    assert after[0]["dp_dummy_steps"] - before[0]["dp_dummy_steps"] <= 2
    control = _control()
    assert not control["running"] and control["waves_completed"] > waves_before
    assert not any(s["dp_running"] for s in after.values())
    pids = [s["pid"] for s in after.values()]
    busy_start = _cpu_seconds(pids)
    time.sleep(3.0)
    idle = (_cpu_seconds(pids) - busy_start) / 3.0
    assert idle < 0.15, f"paused replicas use {idle:.2f} cores: something spins"


def test_metrics_show_the_lockstep_state(app):
    """In the app's /metrics, and from the coordinator on Ray's export (the dashboard)."""
    import ray

    _, url = app
    text = httpx.get(url + "/metrics", timeout=30).text
    for name in ("raylm:dp_wave", "raylm:dp_waves_completed", "raylm:dp_ranks_running"):
        assert f"\n{name} " in text, name
    waves = [line for line in text.splitlines() if line.startswith("raylm:dp_waves_completed ")]
    assert float(waves[0].split()[1]) >= 1  # the previous tests ran waves
    assert ('raylm:dp_dummy_steps{dp_rank="1"}' in text
            and 'raylm:dp_dummy_step_seconds{dp_rank="1"}' in text)
    node = ray.nodes()[0]
    export = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.time() + 90  # Ray exports on a period (several seconds)
    while time.time() < deadline:
        lines = httpx.get(export, timeout=10).text.splitlines()
        if any(l.startswith("ray_raylm_dp_wave") for l in lines) and \
                any(l.startswith("ray_raylm_dp_dummy_steps") and 'dp_rank="1"' in l
                    for l in lines):
            return
        time.sleep(3)
    pytest.fail(f"no lockstep metrics on {export}")


@pytest.mark.timeout(600)
def test_elastic_scaling_2_3_1_under_load_loses_nothing(app):
    path, url = app
    prompts = random_prompts(6, seed=53)
    expected = [continuation(path, p, o)
                for p, o in zip(prompts, hf_greedy(path, prompts, MAX_NEW))]

    async def run():
        load = SteadyLoad(url, prompts, expected, MAX_NEW)
        runner = asyncio.create_task(load.run())
        sizes = []
        async with httpx.AsyncClient(timeout=600) as client:
            async def scaling_now():
                status = await is_scaling(client, url)
                return status if status["is_scaling_elastic_ep"] else None

            await load.served_more(4, "the steady load being served")
            for n in (3, 1):
                scaling = asyncio.create_task(scale(client, url, n))
                busy = await async_wait_for(scaling_now, 30,
                                            f"the scale to {n} reported as running", 0.05)
                second = await scale(client, url, 2)  # one scale at a time
                r = await scaling
                assert r.status_code == 200, r.text
                assert (busy["progress"]["to"] == n and second.status_code
                        == 409), (busy, second.text)
                assert await is_scaling(client, url) == {"is_scaling_elastic_ep": False,
                                                         "progress": None}
                await load.served_more(4, "serving resuming after the scale")
                sizes.append([(s["dp_rank"], s["dp_experts"]) for s in _table()])
        load.stop.set()
        await asyncio.wait_for(runner, 120)
        return load, sizes

    load, sizes = asyncio.run(run())
    results = load.results
    # 4 experts over 3 ranks, contiguous
    assert sizes[0] == [(0, [0, 1]), (1, [2]), (2, [3])], sizes
    assert sizes[1] == [(0, [0, 1, 2, 3])], sizes
    assert not load.lost(), load.lost()
    assert sum(r[0] == 200 for r in results) > 10 and any(r[0] == 503 for r in results)


def test_drain_timeout_answers_408_and_keeps_the_size(app):
    path, url = app

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            long = asyncio.create_task(complete(client, url, [5, 6, 7], 400))
            await async_wait_for(lambda: any(s["num_running"] for s in _table()), 30,
                                 "the long request running")
            r = await scale(client, url, 2, drain_timeout=0.5)
            return r, await long

    r, long = asyncio.run(run())
    assert r.status_code == 408 and r.json()["error"]["code"] == "drain_timeout", r.text
    # the in-flight one finished
    assert long.status_code == 200 and long.json()["usage"]["completion_tokens"] == 400
    assert len(_table()) == 1 and _control()["scaling"] is None


def test_bad_scale_and_rank_requests_get_clear_4xx(app):
    _, url = app
    cases = [
        ("/scale_elastic_ep", {"new_data_parallel_size": 0}, ADMIN, 400, "new_data_parallel_size"),
        # 5 ranks, 4 experts
        ("/scale_elastic_ep", {"new_data_parallel_size": 5}, ADMIN, 400, "experts"),
        ("/scale_elastic_ep", {"new_data_parallel_size": 2, "drain_timeout": -1}, ADMIN, 400,
         "drain_timeout"),
        # the admin key, or nothing
        ("/scale_elastic_ep", {"new_data_parallel_size": 2}, {}, 401, "API key"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2},
         {"X-data-parallel-rank": "x"}, 400, "X-data-parallel-rank"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2},
         {"X-data-parallel-rank": "7"}, 400, "out of range"),
    ]
    for path, body, headers, status, word in cases:
        r = httpx.post(url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == status and word in r.text, (path, body, r.status_code, r.text)
        assert r.json()["error"]["message"]
    assert _control()["scaling"] is None  # nothing was left half-started


@pytest.mark.timeout(400)
def test_a_crashed_replica_is_replaced_and_the_group_re_forms(app):
    """Kill one of two EP replicas (no goodbye) while idle: Serve replaces it, the coordinator
    drops the silent member once the replacement claims a place, the survivor re-forms with
    the newcomer, and both serve correct greedy outputs again."""
    import ray

    path, url = app
    prompts = random_prompts(2, seed=54)
    expected = [continuation(path, p, o)
                for p, o in zip(prompts, hf_greedy(path, prompts, MAX_NEW))]

    async def scale_to_2():
        async with httpx.AsyncClient(timeout=600) as client:
            return await scale(client, url, 2)

    assert asyncio.run(scale_to_2()).status_code == 200
    generation = _control()["generation"]
    victim = next(s for s in _table() if s["dp_rank"] == 1)
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if victim["replica"] in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        control = _control()
        if (control["generation"] > generation and control["formed"]
                and len(control["ranks"]) == 2 and victim["replica"] not in control["ranks"]):
            break
        time.sleep(2)
    else:
        pytest.fail(f"the group did not re-form without the dead replica: {_control()}")

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[complete(client, url, p, MAX_NEW, rank=i)
                                          for i, p in enumerate(prompts)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected


def test_ep_over_dp2_x_tp2_through_handles_equals_hf(app, tiny_root):
    """EP over every replica's TP ranks (DP=2 x TP=2: four EP ranks, one expert each), called
    through the Python handle with each request pinned to a replica: token ids equal HF's."""
    from ray import serve

    from raylm.deployments.openai import run_app

    path = make_tiny_model(tiny_root, "qwen3_moe")
    run_app({"model": str(path), "dtype": "float32", "dp": 2, "tp": 2,
             "enable_expert_parallel": True, "num_cpus_per_replica": 0.5, "worker_num_cpus": 1,
             "max_model_len": 256, "num_blocks": 64},
            name="raylm-ep-tp", route_prefix=None)
    try:
        handle = serve.get_app_handle("raylm-ep-tp")
        prompts = random_prompts(4, seed=55)
        params = {"max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
        futures = [handle.generate.remote(p, params, data_parallel_rank=i % 2)
                   for i, p in enumerate(prompts)]
        outs = [f.result(timeout_s=180) for f in futures]
        assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, MAX_NEW)
        assert [o.metrics["dp_rank"] for o in outs] == [0, 1, 0, 1]  # the pins were honoured
    finally:
        serve.delete("raylm-ep-tp")


@pytest.mark.timeout(300)
def test_a_scale_that_cannot_be_placed_rolls_back_and_the_group_serves_again(app):
    """2 -> 3 with the cluster's CPUs held elsewhere: 504 within the call's timeout, naming what
    was missing; the target goes back to 2, the two replicas re-form the group and serve
    HF's greedy outputs again."""
    path, url = app
    prompts = random_prompts(2, seed=56)
    expected = [continuation(path, p, o)
                for p, o in zip(prompts, hf_greedy(path, prompts, MAX_NEW))]

    async def run():
        async with httpx.AsyncClient(timeout=300) as client:
            if len(_table()) != 2:
                assert (await scale(client, url, 2)).status_code == 200
            with cluster_full():
                start = time.monotonic()
                r = await scale(client, url, 3, timeout=10)
                took = time.monotonic() - start
            return r, took

    r, took = asyncio.run(run())
    error = r.json()["error"]
    assert (r.status_code == 504 and error["code"] == "scale_timeout"
            and "back to 2" in error["message"]), r.text
    print(f"\nEP scale 2 -> 3 that cannot be placed: answered after {took:.1f} s: "
          f"{error['message']}")

    def reformed():
        control = _control()
        return control["scaling"] is None and control["formed"] and len(control["ranks"]) == 2

    wait_for(reformed, 60, "the group re-formed at 2 after the rollback", detail=_control)

    async def served():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[complete(client, url, p, MAX_NEW, rank=i)
                                          for i, p in enumerate(prompts)])

    responses = asyncio.run(served())
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert [r.json()["choices"][0]["text"] for r in responses] == expected
