"""EngineCore: scheduler + executor. One `step()` = schedule, run the model, update state."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, List

from raylm.config import EngineConfig
from raylm.engine.request import Request
from raylm.engine.sched_output import EngineCoreOutput
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
            raise ValueError(f"max_model_len ({max_model_len}) exceeds the KV cache ({capacity} tokens in "
                             f"{num_blocks} blocks): raise kv_cache_memory or lower max_model_len")
        gib = num_blocks * self.executor.kv_bytes_per_block() / (1 << 30)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); %.1fx max_model_len %d",
                    num_blocks, block_size, capacity, gib, capacity / max_model_len, max_model_len)
        self.num_blocks = num_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, max_model_len)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> List[EngineCoreOutput]:
        if not self.scheduler.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        model_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, model_output)

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.scheduler.kv
        return EngineStats(s.num_waiting, s.num_running, kv.usage, kv.num_free_blocks, kv.num_blocks,
                           s.num_preemptions, kv.prefix_queries, kv.prefix_hits)

    def shutdown(self) -> None:
        self.executor.shutdown()
