"""LLMServer: one data-parallel engine replica (a Serve deployment replica).

Each replica owns an AsyncEngine and its executor, knows its DP rank (Serve's replica
rank), pushes its load to the DP coordinator when it changes (at most every ~100 ms),
and records the same metrics to the Ray dashboard. Serve calls `check_health` on a
period; a dead engine loop or executor fails it and Serve replaces the replica.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from functools import partial
from typing import Any, Dict, List, Optional

from raylm.config import EngineConfig
from raylm.engine.async_engine import AsyncEngine
from raylm.sampling_params import SamplingParams
from raylm.serve.lockstep import LockstepMember
from raylm.serve.output_channel import ChannelAddress, OutputSender

logger = logging.getLogger(__name__)

PUSH_INTERVAL_S = 0.1
HEARTBEAT_S = 1.0
COORDINATOR_ACTOR = "dp_coordinator"
DEAD_REPLICA_WAITING = 1 << 20


class LLMServer:
    def __init__(self, engine_config: Dict[str, Any], model_name: str) -> None:
        import ray
        from ray import serve

        ctx = serve.get_replica_context()
        self.dp_rank = ctx.rank.rank
        self.replica_key = ctx.replica_id.unique_id
        self.model_name = model_name
        self.node_ip = ray.util.get_node_ip_address()
        self.coordinator = serve.get_deployment_actor(COORDINATOR_ACTOR)
        self.coordinator_identity = tuple(ray.get(self.coordinator.identity.remote()))
        config = EngineConfig(**engine_config)
        self.lockstep: Optional[LockstepMember] = None
        if config.parallel.expert_dp:  # MoE experts spread over every replica: join the group first
            self.lockstep = LockstepMember(self.coordinator, self.replica_key, config.parallel.data_parallel_size)
            config = config.model_copy(update={"parallel": config.parallel.model_copy(
                update=self.lockstep.parallel_fields())})
        self.engine = AsyncEngine(config)
        if self.lockstep is not None:
            self.lockstep.attach(self.engine)  # no warmup: a lone forward would wait on the others
        else:
            self.engine.warmup()  # the first request must not pay for oneDNN's JIT (~10 s)
        self._inflight = 0  # generate() calls in this replica, whether or not the engine has them yet
        self._pusher: Optional[asyncio.Task] = None
        self._last_pushed: Optional[Dict] = None
        self._metrics = None
        self._published: Dict[str, Dict] = {}  # the last stats published per rank (counter deltas)
        self.sender = OutputSender()
        self.engine.add_step_listener(self.sender.flush)
        logger.info("LLMServer dp_rank=%d ready (%s)", self.dp_rank, model_name)

    def __del__(self) -> None:
        """Serve's shutdown hook (scale-down, redeploy): leave the coordinator's table so
        metrics and routers forget this replica; stop the engine's worker actors."""
        try:
            self.coordinator.remove.remote(self.replica_key)
            self.sender.close()
            self.engine.shutdown()
        except Exception:  # shutting down anyway
            pass

    @property
    def rank(self) -> int:
        """DP rank: the group's for expert-parallel replicas (it changes on re-forming), else Serve's."""
        return self.lockstep.rank if self.lockstep is not None else self.dp_rank

    async def generate(self, channel: ChannelAddress, key: int, prompt_token_ids: List[int],
                       params: SamplingParams, request_id: str, data_parallel_rank: Optional[int] = None) -> None:
        """Run one request, sending its outputs (deltas when `params.output_kind == "delta"`,
        as the ingress asks) to the ingress's output channel under `key`: every step's in one
        frame, sent before the next step starts. Returns once the last one is on its way;
        cancelling the call aborts the request. `data_parallel_rank` is a routing hint the
        router has already acted on."""
        self._ensure_pusher()
        timer = self._timer(len(prompt_token_ids), params.output_kind == "delta")
        self._inflight += 1
        try:
            conn = await self.sender.connection(channel)
            done = asyncio.get_running_loop().create_future()
            self.engine.submit({"prompt_token_ids": prompt_token_ids}, params, request_id,
                               partial(self._forward, conn, key, timer, done))
            try:
                await done
            finally:
                finished = done.done() and not done.cancelled() and done.exception() is None
                self.engine.release(request_id, finished)
            await conn.drain()
        finally:
            self._inflight -= 1

    def _forward(self, conn, key: int, timer, done: asyncio.Future, item) -> None:
        """A request's output sink, on the engine loop: outputs to the channel, the end to `done`."""
        if done.done():
            return
        if isinstance(item, BaseException):
            done.set_exception(item)
            return
        item.metrics["dp_rank"] = self.rank
        if timer is not None:
            timer.update(item, self.rank)
        conn.send(key, item)
        if item.finished:
            done.set_result(None)

    def stats(self) -> Dict[str, Any]:
        s = self.engine.stats()
        # Requests accepted here but not yet in the engine's queues count as waiting: a report
        # must not make a replica look idler than it is (the router trusts fresh reports).
        waiting = max(s.num_waiting, self._inflight - s.num_running)
        if self.engine.dead is not None:
            # A dead engine (e.g. a TP worker died) is idle and would win every routing
            # decision until Serve replaces it; report it as unreachable instead.
            waiting = DEAD_REPLICA_WAITING
        return {"dp_rank": self.rank, "replica": self.replica_key, "computed_at": time.time(),
                "pid": os.getpid(), "node_ip": self.node_ip, "num_waiting": waiting,
                "num_running": s.num_running, "kv_cache_usage": s.kv_cache_usage,
                "num_free_blocks": s.num_free_blocks, "num_blocks": s.num_blocks,
                "num_preemptions": s.num_preemptions, "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, **self._wave_stats()}

    def _wave_stats(self) -> Dict[str, Any]:
        waves = self.engine.waves
        if waves is None:
            return {}
        return {"dp_wave": waves.wave, "dp_running": waves.running, "dp_dummy_steps": waves.dummy_steps,
                "dp_dummy_seconds": round(waves.dummy_seconds, 4), "dp_experts": self.lockstep.experts}

    async def record_routing_stats(self) -> Dict[str, Any]:
        """Serve polls this; the router uses it to find the coordinator and as a fallback."""
        self._ensure_pusher()
        return {**self.stats(), "coordinator": self.coordinator_identity}

    async def check_health(self) -> None:
        self.engine.check_health()

    def coordinator_info(self):
        return self.coordinator_identity

    # ---- load reporting ----------------------------------------------------------

    def _ensure_pusher(self) -> None:
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())
        if self.lockstep is not None:
            self.lockstep.ensure_watching()

    async def _push_loop(self) -> None:
        last_push, held_prefix = 0.0, None  # the prefix summary version the coordinator holds
        while True:
            stats = self.stats()
            # the summary is copied only when the coordinator lacks this version of it
            held = -1 if held_prefix is None else held_prefix
            block_size, prefix_version, prefix_blocks = self.engine.prefix_summary(held)
            load = {k: stats[k] for k in ("num_waiting", "num_running", "num_free_blocks", "dp_rank")}
            # the expert assignment too: a re-formed EP group must show in the table at once
            load.update({k: stats.get(k) for k in ("dp_running", "dp_dummy_steps", "dp_experts")})
            load["prefix_version"] = prefix_version
            # on change, and at least every HEARTBEAT_S: a silent replica is presumed gone
            if load != self._last_pushed or time.monotonic() - last_push > HEARTBEAT_S:
                last_push = time.monotonic()
                stats["block_size"] = block_size
                if prefix_version != held_prefix:  # the summary only when the coordinator lacks it
                    stats.update(prefix_blocks=prefix_blocks, prefix_version=prefix_version)
                try:
                    held_prefix = await self.coordinator.report.remote(self.replica_key, stats)
                    self._last_pushed = load
                    self._publish(stats)
                except Exception as exc:  # coordinator being recreated: retry next tick
                    logger.warning("cannot reach the DP coordinator: %s", exc)
            await asyncio.sleep(PUSH_INTERVAL_S)

    def _publish(self, stats: Dict[str, Any]) -> None:
        """The engine's gauges and counters (running, waiting, KV use, prefix cache,
        preemptions) on Ray's metrics export too, where the dashboard reads them."""
        from raylm.serve.metrics import publish_engine_stats

        try:
            publish_engine_stats(self._sink(), self.model_name, [stats], self._published)
        except Exception as exc:  # metrics must never stop serving
            logger.debug("engine metrics not published: %r", exc)

    def _sink(self):
        """This replica's RaySink, made on first use (raises if Ray's metrics are unavailable)."""
        from raylm.serve.metrics import RaySink

        self._metrics = self._metrics or RaySink()
        return self._metrics

    def _timer(self, num_prompt_tokens: int, deltas: bool):
        from raylm.serve.metrics import RequestTimer

        try:
            sink = self._sink()
        except Exception:  # metrics must never fail a request
            return None
        return RequestTimer(sink, self.model_name, num_prompt_tokens, deltas)
