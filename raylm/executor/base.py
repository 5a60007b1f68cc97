"""Executor ABC: how the engine reaches its workers. `execute_model` runs one step;
`collective_rpc` calls a Worker method on every worker and returns their results."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, List, Sequence

from raylm.config import EngineConfig
from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput


class _Done:
    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class Executor(ABC):
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path

    @abstractmethod
    def collective_rpc(self, method: str, args: Sequence[Any] = ()) -> List[Any]:
        """Call Worker.<method>(*args) on every worker; results in rank order."""

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one scheduled step; returns the sampled tokens."""

    def initialize(self) -> int:
        """Start the workers, load weights, size and allocate the KV cache; returns num_blocks
        (the minimum over workers, so every rank fits the same block table)."""
        self.collective_rpc("init_device", self.init_device_args())
        self.collective_rpc("load_model")
        num_blocks = min(self.collective_rpc("determine_num_blocks"))
        self.collective_rpc("init_kv_cache", (num_blocks,))
        self.collective_rpc("capture_graphs")
        return num_blocks

    def init_device_args(self) -> Sequence[Any]:
        """Worker.init_device's arguments (the Ray executor's rendezvous address)."""
        return ()

    def kv_bytes_per_block(self) -> int:
        return self.collective_rpc("kv_bytes_per_block")[0]

    def execute_model_async(self, sched: SchedulerOutput):
        """Submit a step; returns an object whose `result()` is the ModelRunnerOutput.
        Executors that cannot overlap steps run it now."""
        return _Done(self.execute_model(sched))

    def due_in(self) -> float:
        """Seconds until the last step's results are due. A real executor returns once they
        are (0); the simulated one, told `defer_device_time()`, returns at once instead of
        sleeping through its simulated step, and its caller waits this long without
        blocking its event loop (several simulated engines then share one process)."""
        return 0.0

    def defer_device_time(self) -> None:
        """Let `execute_model` return before its (simulated) device time has passed; see
        `due_in`. A no-op for executors whose device work is real."""

    def check_health(self) -> None:
        if not all(self.collective_rpc("check_health")):
            raise RuntimeError("a worker reported unhealthy")

    def shutdown(self) -> None:
        pass


def create_executor(config: EngineConfig, model_path: str) -> Executor:
    """In-process for one worker; the Ray actor-group executor for TP/PP (or when asked);
    the simulated one when asked."""
    if config.parallel.distributed_executor_backend == "sim":
        from raylm.executor.sim import SimExecutor

        return SimExecutor(config, model_path)
    if config.parallel.world_size > 1 or config.parallel.distributed_executor_backend == "ray":
        from raylm.executor.ray_executor import RayExecutor

        return RayExecutor(config, model_path)
    from raylm.executor.uniproc import UniprocExecutor

    return UniprocExecutor(config, model_path)
