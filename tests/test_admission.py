"""Admission control without Ray: the ingress's app-wide bound, deadline and shutdown drain
(raylm.serve.admission) over fake streams, and the engine's waiting-queue bound over a
tiny-llama AsyncEngine. References: hand-counted requests and the engine's block accounting."""
from __future__ import annotations

import asyncio

import pytest

from raylm.exceptions import EngineOverloadedError, EngineUnavailableError, RequestTimeoutError
from raylm.serve.admission import Admission
from raylm.serve.errors import to_api_error
from tests.waiting import async_wait_for


class FakeStream:
    """An async generator stand-in that yields `n` items `delay` seconds apart and records
    closing."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay, self.closed, self.sent = n, delay, False, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.sent == self.n:
            raise StopAsyncIteration
        await asyncio.sleep(self.delay)
        self.sent += 1
        return self.sent

    async def aclose(self):
        self.closed = True


async def _drain_stream(admission: Admission, stream: FakeStream):
    return [x async for x in admission.guard(stream)]


def test_bound_refuses_past_max_ongoing_and_recovers():
    async def main():
        admission = Admission(max_ongoing_requests=2)
        streams = [FakeStream(3, 0.05) for _ in range(2)]
        tasks = [asyncio.ensure_future(_drain_stream(admission, s)) for s in streams]
        await async_wait_for(lambda: admission.ongoing == 2, 5, "both streams admitted", 0.001)
        with pytest.raises(EngineOverloadedError, match="max_ongoing_requests=2"):
            await _drain_stream(admission, FakeStream(1, 0))
        assert [await t for t in tasks] == [[1, 2, 3]] * 2
        assert admission.ongoing == 0 and all(s.closed for s in streams)
        assert await _drain_stream(admission, FakeStream(1, 0)) == [1]  # room again

    asyncio.run(main())
    err = to_api_error(EngineOverloadedError("x"))
    assert (err.status == 429 and err.headers["Retry-After"] == "1" and err.type
            == "rate_limit_error")


def test_deadline_aborts_the_stream_with_408():
    async def main():
        admission = Admission(max_ongoing_requests=8, request_timeout_s=0.2)
        slow = FakeStream(100, 0.05)
        got = []
        with pytest.raises(RequestTimeoutError, match="request_timeout=0.2"):
            async for x in admission.guard(slow):
                got.append(x)
        assert len(got) < 100 and slow.closed and admission.ongoing == 0  # cut off, not run out
        # fast ones unaffected
        assert await _drain_stream(admission, FakeStream(2, 0.01)) == [1, 2]

    asyncio.run(main())
    assert to_api_error(RequestTimeoutError("late")).status == 408


def test_guard_costs_no_task_per_item_and_leaves_its_consumer_uncancelled():
    """The deadline and the cut-off cost nothing per item (no task is created while guarded
    items flow), and a consumer the deadline interrupted is not left cancelled: it still
    awaits (an SSE error event goes out after the error)."""
    async def main():
        created = []
        asyncio.get_running_loop().set_task_factory(
            lambda loop, coro, **kw: created.append(coro) or asyncio.Task(coro, loop=loop, **kw))
        admission = Admission(max_ongoing_requests=1, request_timeout_s=0.2)
        assert await _drain_stream(admission, FakeStream(50, 0)) == list(range(1, 51))
        assert created == []
        slow = FakeStream(100, 0.05)
        with pytest.raises(RequestTimeoutError):
            await _drain_stream(admission, slow)
        assert asyncio.current_task().cancelling() == 0 and slow.closed
        await asyncio.sleep(0.01)  # not cancelled again

    asyncio.run(main())


def test_consumer_cancelled_by_its_caller_stays_cancelled():
    """A client that leaves cancels the task reading the guarded stream: that is a
    CancelledError (not an API error), and the stream is closed (the request aborted)."""
    async def main():
        admission = Admission(max_ongoing_requests=2, request_timeout_s=60)
        slow = FakeStream(100, 0.05)
        task = asyncio.ensure_future(_drain_stream(admission, slow))
        await async_wait_for(lambda: slow.sent >= 2, 5, "two items through", 0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert slow.closed and admission.ongoing == 0

    asyncio.run(main())


def test_drain_lets_short_requests_finish_and_cuts_off_the_rest():
    async def main():
        admission = Admission(max_ongoing_requests=8)
        short, long = FakeStream(3, 0.05), FakeStream(1000, 0.05)
        t_short = asyncio.ensure_future(_drain_stream(admission, short))
        t_long = asyncio.ensure_future(_drain_stream(admission, long))
        await async_wait_for(lambda: admission.ongoing == 2, 5, "both streams admitted", 0.001)
        drain = asyncio.ensure_future(admission.drain(0.5))
        await async_wait_for(lambda: admission.draining, 5, "the drain starting", 0.001)
        with pytest.raises(EngineUnavailableError, match="shutting down"):  # new requests: 503
            await _drain_stream(admission, FakeStream(1, 0))
        assert await t_short == [1, 2, 3]
        with pytest.raises(EngineUnavailableError, match="shutdown timeout 0.5 s"):
            await t_long
        assert await drain == 1 and long.closed and admission.ongoing == 0

    asyncio.run(main())
    assert to_api_error(EngineUnavailableError("bye")).status == 503


def test_engine_refuses_past_max_waiting_requests_and_frees_every_block(tiny_llama):
    from raylm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from raylm.engine.async_engine import AsyncEngine
    from raylm.sampling_params import SamplingParams

    config = EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                            max_model_len=128),
                          cache=CacheConfig(num_blocks=32),
                          scheduler=SchedulerConfig(max_num_seqs=1, max_waiting_requests=2))
    engine = AsyncEngine(config)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def one(i):
        return [o async
                for o in engine.generate({"prompt_token_ids": [5, 6, 7]}, params, f"r{i}")][-1]

    async def main():
        tasks = [asyncio.ensure_future(one(i)) for i in range(3)]  # one runs, two wait
        await asyncio.sleep(0)
        # three queued for the loop, one will run: the fourth is refused
        assert engine.num_waiting() == 2
        with pytest.raises(EngineOverloadedError, match="max_waiting_requests=2"):
            await one(3)
        outs = await asyncio.gather(*tasks)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert (await one(4)).finished  # the queue drained: admitted again

    asyncio.run(main())
    stats = engine.stats()
    assert (stats.num_free_blocks == stats.num_blocks and stats.num_waiting == stats.num_running
            == 0)


def test_watchdog_marks_a_stuck_step_dead_and_fails_its_streams(tiny_llama):
    """A step that runs past step_timeout_s (here: the model blocks for 1.5 s against a 0.3 s
    timeout) marks the engine dead while it runs; when it returns, every stream fails."""
    import time

    from raylm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from raylm.engine.async_engine import AsyncEngine, EngineDeadError
    from raylm.sampling_params import SamplingParams

    config = EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                            max_model_len=128),
                          cache=CacheConfig(num_blocks=32),
                          scheduler=SchedulerConfig(step_timeout_s=0.3))
    engine = AsyncEngine(config)
    real_step = engine.engine.step
    engine.engine.step = lambda: (time.sleep(1.5), real_step())[1]

    async def main():
        gen = engine.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4), "r0")
        with pytest.raises(EngineDeadError, match=r"step_timeout_s=0.3 s \(stuck\)"):
            async for _ in gen:
                pass
        with pytest.raises(EngineDeadError, match="stuck"):
            engine.check_health()

    asyncio.run(main())


def test_http_answers_408_and_429_in_openai_shape_and_frees_blocks(tiny_llama):
    """The OpenAI app over an in-process engine with admission: a request past its deadline
    gets 408 (before streaming) or an in-band SSE error (once streaming); one past the
    in-flight bound gets 429 with Retry-After; every block is free afterwards."""
    import json
    import time

    import httpx

    from raylm.config import CacheConfig, EngineConfig, ModelConfig
    from raylm.engine.async_engine import AsyncEngine
    from raylm.serve.engine_client import LocalEngineClient
    from raylm.serve.openai_app import create_app

    engine = AsyncEngine(EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                                        max_model_len=128),
                                      cache=CacheConfig(num_blocks=32)))
    real_step = engine.engine.step
    # ~20 tokens/s: slow enough to time out
    engine.engine.step = lambda: (time.sleep(0.05), real_step())[1]
    admission = Admission(max_ongoing_requests=1, request_timeout_s=0.5)
    app = create_app(LocalEngineClient(engine, "tiny", admission))
    body = {"prompt": [5, 6, 7], "max_tokens": 60, "ignore_eos": True}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app",
                                     timeout=30) as http:
            slow = await http.post("/v1/completions", json=body)
            assert (slow.status_code == 408 and slow.json()["error"]["code"]
                    == "request_timeout"), slow.text
            events = []
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
            assert (events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"]
                    == "request_timeout")
            first = asyncio.ensure_future(http.post("/v1/completions",
                                                    json={**body, "max_tokens": 4}))
            await async_wait_for(lambda: admission.ongoing == 1, 10, "the first request admitted",
                                 0.001)
            busy = await http.post("/v1/completions", json=body)
            assert busy.status_code == 429 and busy.headers["Retry-After"] == "1", busy.text
            assert busy.json()["error"]["type"] == "rate_limit_error"
            assert (await first).status_code == 200

    asyncio.run(main())
    stats = engine.stats()
    assert (stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting
            == 0)


def test_shutdown_stops_the_watchdog_thread(tiny_llama):
    """After AsyncEngine.shutdown() no engine thread is left running (one still running native
    code while the interpreter exits can crash it)."""
    from raylm.config import CacheConfig, EngineConfig, ModelConfig
    from raylm.engine.async_engine import AsyncEngine
    from raylm.sampling_params import SamplingParams

    engine = AsyncEngine(EngineConfig(model=ModelConfig(model=str(tiny_llama), dtype="float32",
                                                        max_model_len=128),
                                      cache=CacheConfig(num_blocks=32)))

    async def main():
        outs = [o async
                for o in engine.generate({"prompt_token_ids": [5, 6, 7]},
                                         SamplingParams(max_tokens=3), "r")]
        assert outs[-1].finished and engine._watchdog.is_alive()
        engine.shutdown()

    asyncio.run(main())
    assert not engine._watchdog.is_alive()
