"""Dense DP resizing: Serve autoscaling grows the LLMServer replica set under load and
shrinks it when idle, and POST /scale_elastic_ep resizes it on demand; every request
succeeds across the resizes, or (elastic) gets 503 + Retry-After while the scale runs
(the reference is HF greedy)."""
from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest

from tests.conftest import hf_greedy, random_prompts
from tests.serve_load import ADMIN_KEY, SteadyLoad, cluster_full, continuation, scale, served_app
from tests.waiting import async_wait_for, wait_for

pytestmark = pytest.mark.slow


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["raylm"].deployments["LLMServer"]
    return status.replica_states.get("RUNNING", 0)


@pytest.mark.timeout(400)
def test_autoscaling_grows_and_shrinks_without_losing_requests(tiny_root, ray_session):
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 2, "downscale_delay_s": 5, "metrics_interval_s": 1,
               "look_back_period_s": 2}
    with served_app(tiny_root, autoscaling_config=scaling) as (path, base):
        url = base + "/v1/completions"
        assert _running_replicas() == 1
        prompts = random_prompts(10, seed=31)
        expected = hf_greedy(path, prompts, 300)

        async def one(client, prompt):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 300, "temperature": 0,
                    "ignore_eos": True}
            r = await client.post(url, json=body)
            assert r.status_code == 200, r.text
            return r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["text"]

        async def load():
            """Keep 8 requests in flight until Serve has added a replica, then one more wave
            (which the router spreads over both); returns (prompt index, result) pairs."""
            done, pending, i, grew_at = [], set(), 0, None
            deadline = time.monotonic() + 150
            async with httpx.AsyncClient(timeout=300) as client:
                while time.monotonic() < deadline and (grew_at is None or i < grew_at + 8):
                    while len(pending) < 8:
                        task = asyncio.create_task(one(client, prompts[i % len(prompts)]))
                        task.index = i % len(prompts)
                        pending.add(task)
                        i += 1
                    finished, pending = await asyncio.wait(pending, timeout=1,
                                                           return_when=asyncio.FIRST_COMPLETED)
                    done += finished
                    if grew_at is None and _running_replicas() == 2:
                        grew_at = i
                done += await asyncio.gather(*pending) and pending
            return grew_at is not None, [(t.index, t.result()) for t in done]

        grew, results = asyncio.run(load())
        assert grew, "Serve did not add a replica under load"
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        assert len(results) >= 16
        for index, (n, text) in results:  # every request succeeded, across the resize
            prompt, want = prompts[index], expected[index]
            full = tok.decode(prompt + want, skip_special_tokens=True)
            head = tok.decode(prompt, skip_special_tokens=True)
            assert n == 300 and text == full[len(head):]
        wait_for(lambda: _running_replicas() == 1, 120, "scaling back to one replica", 1)
        r = httpx.post(url,
                       json={"model": "tiny", "prompt": prompts[0], "max_tokens": 5,
                             "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text


@pytest.mark.timeout(500)
def test_elastic_scale_of_a_dense_app_is_bounded_rolls_back_and_resizes(tiny_root, ray_session):
    """Under a steady load: an absurd size is refused before anything changes; a scale the
    cluster cannot place (its CPUs held elsewhere) answers 504 within its timeout with the
    target rolled back; then 1 -> 2 -> 1 works. A dense app serves throughout: every request
    succeeds with HF's greedy text, none gets a 503."""
    with served_app(tiny_root, dp=1, admin_api_key=ADMIN_KEY) as (path, url):
        _elastic_round_trip(path, url)


def _total_replicas() -> int:
    from ray import serve

    states = serve.status().applications["raylm"].deployments["LLMServer"].replica_states
    return sum(states.values())


def _elastic_round_trip(path, url):
    prompts = random_prompts(6, seed=32)
    expected = [continuation(path, p, o) for p, o in zip(prompts, hf_greedy(path, prompts, 16))]
    figures = {}

    async def refused_and_rolled_back(client, load):
        start = time.monotonic()
        r = await scale(client, url, 24550920)
        figures["refused_s"] = time.monotonic() - start
        assert r.status_code == 400 and re.search(r"the cluster holds at most \d+ replicas \(",
                                                  r.text), r.text
        assert _total_replicas() == 1 and _running_replicas() == 1
        with cluster_full():
            start = time.monotonic()
            r = await scale(client, url, 2, timeout=8)
            figures["gave_up_s"] = time.monotonic() - start
        error = r.json()["error"]
        assert r.status_code == 504 and error["code"] == "scale_timeout", r.text
        assert ("1 of 2 replicas serving" in error["message"]
                and "back to 1" in error["message"]), error
        figures["error"] = error["message"]
        await async_wait_for(lambda: _total_replicas() == 1, 60,
                             "the unplaced replica dropped (target back to 1)")
        await load.served_more(5, "the load served after the rollback")

    async def run():
        load = SteadyLoad(url, prompts, expected, 16)
        runner = asyncio.create_task(load.run())
        replicas = []
        async with httpx.AsyncClient(timeout=300) as client:
            await load.served_more(5, "the load served before any scale")
            await refused_and_rolled_back(client, load)
            for n in (2, 1):
                r = await scale(client, url, n)
                assert r.status_code == 200, r.text
                replicas.append(_running_replicas())
                await load.served_more(5, f"the load served after the scale to {n}")
        load.stop.set()
        await asyncio.wait_for(runner, 120)
        return load, replicas

    load, replicas = asyncio.run(run())
    print(f"\ndense elastic scaling: absurd size refused in {figures['refused_s'] * 1000:.0f} ms; "
          f"unplaceable scale answered after {figures['gave_up_s']:.1f} s: {figures['error']}; "
          f"{len(load.results)} requests")
    assert replicas == [2, 1]
    assert not load.lost(), load.lost()
    assert all(r[0] == 200 and r[1] is True for r in load.results), [r for r in load.results
                                                                     if r[0] != 200][:5]
