"""EngineCore: scheduler + executor. One `step()` = schedule, run the model, update state."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections import deque
from typing import Deque, Iterable, List, Optional

from raylm.config import EngineConfig
from raylm.dp.waves import EngineWaves
from raylm.engine.request import Request
from raylm.executor.sched_output import EngineCoreOutput
from raylm.engine.scheduler import Scheduler
from raylm.executor.base import create_executor

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class EngineCore:
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int) -> None:
        self.executor = create_executor(config, model_path)
        num_blocks = self.executor.initialize()
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        if capacity < max_model_len:
            self.executor.shutdown()
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the KV cache ({capacity} "
                             f"tokens in {num_blocks} blocks): raise kv_cache_memory or lower "
                             "max_model_len")
        gib = num_blocks * self.executor.kv_bytes_per_block() / (1 << 30)
        device, backend = self.executor.collective_rpc("device_info")[0]
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); %.1fx max_model_len "
                    "%d; device %s, attention backend %s", num_blocks, block_size, capacity, gib,
                    capacity / max_model_len, max_model_len, device, backend)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, max_model_len)
        pp = config.parallel.pipeline_parallel_size
        self.batch_queue: Optional[Deque] = deque(maxlen=pp) if pp > 1 else None
        self.peak_batches_in_flight = 0  # tests check that the pipeline really filled
        self.last_step_times: dict = {}  # the answering worker's phase times (raylm bench)
        # MoE expert parallelism across DP replicas: step in lockstep with them (raylm.dp.waves)
        self.waves: Optional[EngineWaves] = EngineWaves() if config.parallel.expert_dp else None

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        """Work here, or a lockstep wave that other replicas' work keeps running."""
        return (self.scheduler.has_unfinished_requests() or bool(self.batch_queue)
                or (self.waves is not None and self.waves.running))

    def step(self) -> List[EngineCoreOutput]:
        if self.batch_queue is not None:
            return self._step_pipelined()
        if self.waves is not None:
            return self._step_lockstep()
        if not self.scheduler.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        model_output = self.executor.execute_model(scheduler_output)
        self.last_step_times = model_output.timings
        return self.scheduler.update_from_output(scheduler_output, model_output)

    def _step_pipelined(self) -> List[EngineCoreOutput]:
        """With pp stages, keep up to pp steps in flight so no stage idles through a whole
        step: submit a new batch while there is room (and work not already in flight),
        otherwise wait for the oldest and apply its output."""
        queue = self.batch_queue
        if len(queue) < queue.maxlen and self.scheduler.has_unfinished_requests():
            # a 1/pp share of the requests per batch, so the other batches have some too
            share = -(-len(self.scheduler.requests) // queue.maxlen)
            sched = self.scheduler.schedule(max_requests=share)
            if not sched.is_empty or sched.finished_req_ids:  # workers must hear of finished ones
                queue.append((sched, self.executor.execute_model_async(sched)))
                self.peak_batches_in_flight = max(self.peak_batches_in_flight, len(queue))
                if len(queue) < queue.maxlen and not sched.is_empty:
                    return []
        if not queue:
            return []
        sched, future = queue.popleft()
        model_output = future.result()
        self.last_step_times = model_output.timings
        return self.scheduler.update_from_output(sched, model_output)

    def _step_lockstep(self) -> List[EngineCoreOutput]:
        """One step of a wave: real if we have work, else a dummy forward; the workers tell
        how many replicas had work, and none ends the wave here as on every replica."""
        waves, has_work = self.waves, self.scheduler.has_unfinished_requests()
        if not waves.running:
            if not has_work:
                return []
            waves.start_local()
        sched = self.scheduler.schedule()
        sched.dp_unfinished = int(has_work)
        model_output = self.executor.execute_model(sched)
        t = model_output.timings  # a dummy step's own work: its time less the collectives' waits
        waves.after_step(sched.is_empty, model_output.dp_unfinished,
                         t.get("dummy", 0.0) - t.get("comm", 0.0))
        self.last_step_times = model_output.timings
        return self.scheduler.update_from_output(sched, model_output)

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.scheduler.kv
        return EngineStats(s.num_waiting, s.num_running, kv.usage, kv.num_free_blocks,
                           kv.num_blocks, s.num_preemptions, kv.prefix_queries, kv.prefix_hits)

    def prefix_summary(self, known_version: int = -1):
        """(block_size, version, hashes): what routers learn of this engine's prefix cache
        (raylm.dp.prefix); hashes None while the version is still `known_version`."""
        kv = self.scheduler.kv
        return (kv.block_size, *kv.pool.prefix_summary(known_version))

    def shutdown(self) -> None:
        self.executor.shutdown()
