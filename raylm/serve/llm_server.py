"""LLMServer: one data-parallel engine replica (a Serve deployment replica).

Each replica owns an AsyncEngine and its executor, knows its DP rank (Serve's replica
rank), pushes its load to the DP coordinator when it changes (at most every ~100 ms),
and records the same metrics to the Ray dashboard. Serve calls `check_health` on a
period; a dead engine loop or executor fails it and Serve replaces the replica.

With the simulated executor a replica may host several engines (`engines_per_replica`,
for fleet studies on a small machine): each is its own DP rank (replica rank * K + i) and
its own entry in the coordinator's table (key `replica/i`); the router picks one and
names it in the call (`engine_index`). Their loops share the replica's event loop, which
waits out simulated steps instead of sleeping through them.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
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
# A change in free blocks or the prefix version alone (both move every step under load) is
# pushed at most this often, unless the routing policy reads prefixes: each push costs the
# coordinator, this replica and every router CPU that a small machine takes from the engines.
BOOKKEEPING_PUSH_S = 0.5
# what routing reads, pushed at the next tick; the EP fields too: a re-formed EP group must
# show in the table at once
ROUTING_LOAD = ("num_waiting", "num_running", "dp_rank",
                "dp_running", "dp_dummy_steps", "dp_experts")
COORDINATOR_ACTOR = "dp_coordinator"
DEAD_REPLICA_WAITING = 1 << 20


@dataclass
class _Slot:
    """One engine of this replica and its reporting state."""
    engine: AsyncEngine
    key: str  # its entry in the coordinator's table
    index: int
    inflight: int = 0  # generate() calls for it, whether or not the engine has them yet
    held_prefix: Optional[int] = None  # the prefix summary version the coordinator holds
    last_pushed: Optional[Dict] = None  # the load last pushed (what a change is measured against)
    pending_load: Optional[Dict] = None  # the load being pushed
    last_push: float = 0.0


class LLMServer:
    def __init__(self, engine_config: Dict[str, Any], model_name: str,
                 engines_per_replica: int = 1, share_cores: bool = False,
                 prefix_routing: bool = False) -> None:
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
        # MoE experts spread over every replica: join the group first
        if config.parallel.expert_dp:
            self.lockstep = LockstepMember(self.coordinator, self.replica_key,
                                           config.parallel.data_parallel_size)
            config = config.model_copy(update={"parallel": config.parallel.model_copy(
                update=self.lockstep.parallel_fields())})
        self.slots = [_Slot(AsyncEngine(config), self._key(i, engines_per_replica), i)
                      for i in range(engines_per_replica)]
        self.engine = self.slots[0].engine
        if self.lockstep is not None:
            self.lockstep.attach(self.engine)  # no warmup: a lone forward would wait on the others
        else:
            for slot in self.slots:
                slot.engine.warmup()  # the first request must not pay for oneDNN's JIT (~10 s)
        self._pusher: Optional[asyncio.Task] = None
        self._bookkeeping_push_s = PUSH_INTERVAL_S if prefix_routing else BOOKKEEPING_PUSH_S
        self._metrics = None
        self._published: Dict[str, Dict] = {}  # the last stats published per rank (counter deltas)
        self.cpu_share = self._share_cores(config) if share_cores else None
        self.sender = OutputSender()
        for slot in self.slots:
            slot.engine.add_step_listener(self.sender.flush)
        logger.info("LLMServer dp_rank=%d ready (%s)", self.dp_rank, model_name)

    def __del__(self) -> None:
        """Serve's shutdown hook (scale-down, redeploy): leave the coordinator's table so
        metrics and routers forget this replica; stop the engine's worker actors."""
        try:
            for slot in self.slots:
                self.coordinator.remove.remote(slot.key)
            self.sender.close()
            if self.cpu_share is not None:
                self.cpu_share.close()
            for slot in self.slots:
                slot.engine.shutdown()
        except Exception:  # shutting down anyway
            pass

    def _share_cores(self, config: EngineConfig):
        """This engine's slot in its node's core-sharing table (raylm.executor.cpu_share), for a
        CPU engine that runs its model in this process; None otherwise."""
        import ray
        from ray import serve

        from raylm.executor.cpu_share import NodeCpuShare, table_path

        own_model = (config.parallel.world_size == 1
                     and config.parallel.distributed_executor_backend == "uni")
        if (config.model.torch_device().type != "cpu" or not own_model or len(self.slots) > 1
                or self.lockstep is not None):
            return None
        ctx = ray.get_runtime_context()
        cores = int(ctx.get_assigned_resources().get("CPU", 1)) or 1
        path = table_path(ctx.get_node_id(), serve.get_replica_context().app_name)
        share = NodeCpuShare(path, self.dp_rank, cores)
        self.engine.set_busy_hook(share.before_step)
        return share

    def _key(self, index: int, count: int) -> str:
        return self.replica_key if count == 1 else f"{self.replica_key}/{index}"

    def rank(self, slot: _Slot) -> int:
        """DP rank: the group's for expert-parallel replicas (it changes on re-forming), else
        Serve's (times the engines per replica, plus the engine's index)."""
        if self.lockstep is not None:
            return self.lockstep.rank
        return self.dp_rank * len(self.slots) + slot.index

    def _slot(self, engine_index: Optional[int], data_parallel_rank: Optional[int]) -> _Slot:
        """The engine a call runs on: the router's pick, else the pinned rank's, else the
        one with the fewest calls in flight."""
        if engine_index is not None and 0 <= engine_index < len(self.slots):
            return self.slots[engine_index]
        pinned = [s for s in self.slots if self.rank(s) == data_parallel_rank]
        return pinned[0] if pinned else min(self.slots, key=lambda s: s.inflight)

    async def generate(self, channel: ChannelAddress, key: int, prompt_token_ids: List[int],
                       params: SamplingParams, request_id: str,
                       data_parallel_rank: Optional[int] = None,
                       engine_index: Optional[int] = None) -> None:
        """Run one request, sending its outputs (deltas when `params.output_kind == "delta"`,
        as the ingress asks) to the ingress's output channel under `key`: every step's in one
        frame, sent before the next step starts. Returns once the last one is on its way;
        cancelling the call aborts the request. `data_parallel_rank` is a routing hint the
        router has already acted on; `engine_index` is the router's choice of engine here."""
        self._ensure_pusher()
        slot = self._slot(engine_index, data_parallel_rank)
        timer = self._timer(len(prompt_token_ids), params.output_kind == "delta")
        slot.inflight += 1
        try:
            await slot.engine.prepare(params)
            conn = await self.sender.connection(channel)
            done = asyncio.get_running_loop().create_future()
            slot.engine.submit({"prompt_token_ids": prompt_token_ids}, params, request_id,
                               partial(self._forward, conn, key, timer, done, slot))
            try:
                await done
            finally:
                finished = done.done() and not done.cancelled() and done.exception() is None
                slot.engine.release(request_id, finished)
            await conn.drain()
        finally:
            slot.inflight -= 1

    def _forward(self, conn, key: int, timer, done: asyncio.Future, slot: _Slot, item) -> None:
        """A request's output sink, on the engine loop: outputs to the channel, the end to
        `done`."""
        if done.done():
            return
        if isinstance(item, BaseException):
            done.set_exception(item)
            return
        rank = item.metrics["dp_rank"] = self.rank(slot)  # a lockstep rank may change mid-request
        if timer is not None:
            timer.update(item, rank)
        conn.send(key, item)
        if item.finished:
            done.set_result(None)

    def stats(self, slot: Optional[_Slot] = None) -> Dict[str, Any]:
        """One engine's load and counters (the first's by default)."""
        slot = slot or self.slots[0]
        s = slot.engine.stats()
        # Requests accepted here but not yet in the engine's queues count as waiting: a report
        # must not make a replica look idler than it is (the router trusts fresh reports).
        waiting = max(s.num_waiting, slot.inflight - s.num_running)
        if slot.engine.dead is not None:
            # A dead engine (e.g. a TP worker died) is idle and would win every routing
            # decision until Serve replaces it; report it as unreachable instead.
            waiting = DEAD_REPLICA_WAITING
        return {"dp_rank": self.rank(slot), "replica": self.replica_key,
                "engine_index": slot.index, "computed_at": time.time(),
                "pid": os.getpid(), "node_ip": self.node_ip, "num_waiting": waiting,
                "num_running": s.num_running, "kv_cache_usage": s.kv_cache_usage,
                "num_free_blocks": s.num_free_blocks, "num_blocks": s.num_blocks,
                "num_preemptions": s.num_preemptions,
                "prefix_cache_queries": s.prefix_cache_queries,
                "prefix_cache_hits": s.prefix_cache_hits, **self._wave_stats()}

    def _wave_stats(self) -> Dict[str, Any]:
        waves = self.engine.waves
        if waves is None:
            return {}
        return {"dp_wave": waves.wave, "dp_running": waves.running,
                "dp_dummy_steps": waves.dummy_steps,
                "dp_dummy_seconds": round(waves.dummy_seconds, 4),
                "dp_experts": self.lockstep.experts}

    async def record_routing_stats(self) -> Dict[str, Any]:
        """Serve polls this; the router uses it to find the coordinator and as a fallback."""
        self._ensure_pusher()
        return {**self.stats(), "coordinator": self.coordinator_identity}

    async def check_health(self) -> None:
        for slot in self.slots:
            slot.engine.check_health()

    def coordinator_info(self):
        return self.coordinator_identity

    # ---- load reporting ----------------------------------------------------------

    def _ensure_pusher(self) -> None:
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop())
        if self.lockstep is not None:
            self.lockstep.ensure_watching()

    async def _push_loop(self) -> None:
        while True:
            reports = {slot.key: stats for slot in self.slots
                       if (stats := self._report(slot)) is not None}
            if reports:
                try:
                    held = await self.coordinator.report_many.remote(reports)
                    for slot in self.slots:
                        if slot.key in held:
                            slot.held_prefix, slot.last_pushed = held[slot.key], slot.pending_load
                    self._publish(list(reports.values()))
                except Exception as exc:  # coordinator being recreated: retry next tick
                    logger.warning("cannot reach the DP coordinator: %s", exc)
            await asyncio.sleep(PUSH_INTERVAL_S)

    def _report(self, slot: _Slot) -> Optional[Dict[str, Any]]:
        """`slot`'s stats if they are due to be pushed (changed, or a heartbeat), else None.
        The prefix summary rides along only when the coordinator lacks its version."""
        stats = self.stats(slot)
        held = -1 if slot.held_prefix is None else slot.held_prefix
        block_size, prefix_version, prefix_blocks = slot.engine.prefix_summary(held)
        load = {k: stats.get(k) for k in ROUTING_LOAD + ("num_free_blocks",)}
        load["prefix_version"] = prefix_version
        now = time.monotonic()
        if not self._push_due(load, slot.last_pushed, now - slot.last_push):
            return None
        slot.last_push = now
        stats["block_size"], slot.pending_load = block_size, load
        if prefix_version != slot.held_prefix:
            stats.update(prefix_blocks=prefix_blocks, prefix_version=prefix_version)
        return stats

    def _push_due(self, load: Dict[str, Any], last: Optional[Dict], since: float) -> bool:
        """A change in what routing reads goes out at the next tick, one in bookkeeping alone
        after `_bookkeeping_push_s`; and something at least every HEARTBEAT_S (a silent
        replica is presumed gone)."""
        if last is None or since > HEARTBEAT_S:
            return True
        if any(load.get(k) != last.get(k) for k in ROUTING_LOAD):
            return True
        return load != last and since >= self._bookkeeping_push_s

    def _publish(self, stats: List[Dict[str, Any]]) -> None:
        """The engine's gauges and counters (running, waiting, KV use, prefix cache,
        preemptions) on Ray's metrics export too, where the dashboard reads them."""
        from raylm.serve.metrics import publish_engine_stats

        try:
            publish_engine_stats(self._sink(), self.model_name, stats, self._published)
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
