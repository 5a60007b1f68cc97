"""A worker drives one model runner on one device. Executors call it directly (uniproc) or
as a Ray actor (the Ray executor); every method is reachable by `collective_rpc` name."""
from __future__ import annotations

import torch

from raylm.config import EngineConfig, num_threads
from raylm.engine.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.executor.model_runner import ModelRunner


class Worker:
    def __init__(self, config: EngineConfig, model_path: str, rank: int = 0) -> None:
        self.config = config
        self.model_path = model_path
        self.rank = rank
        self.runner: ModelRunner = None

    def init_device(self) -> None:
        threads = num_threads()
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(self.config.model.seed)
        self.runner = ModelRunner(self.config, self.model_path)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)

    def check_health(self) -> bool:
        return self.runner is not None and self.runner.model is not None
