"""One worker, in this process."""
from __future__ import annotations

from typing import Any, List, Sequence

from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.executor.base import Executor
from raylm.executor.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config, model_path: str) -> None:
        super().__init__(config, model_path)
        self.worker = Worker(config, model_path)

    def collective_rpc(self, method: str, args: Sequence[Any] = ()) -> List[Any]:
        return [getattr(self.worker, method)(*args)]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched)
