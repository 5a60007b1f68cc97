"""RayExecutor: a pp x tp grid of Worker actors in one placement group.

Inside a Serve replica the group is the replica's own (`placement_group_bundles`: bundle 0
for the replica, one bundle per worker after it); elsewhere (the offline `LLM`) the
executor makes one, one bundle per worker. Worker 0 names the rendezvous address, every
worker joins the process group, and each step's SchedulerOutput is put in the object
store once and read by every worker. Only the last stage's TP rank 0 returns tokens.

A dead worker must not hang the engine: every wait watches all of the step's workers and
raises WorkerDiedError as soon as any of them fails (a survivor blocked in a collective
would otherwise wait for the gloo timeout), then the executor kills the rest. A stuck one
(alive, never answering) fails the step after `step_timeout_s` the same way.
"""
from __future__ import annotations

import logging
import uuid
from typing import Any, List, Sequence

from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.executor.base import Executor
from raylm.executor.placement import group_strategy, worker_bundle
from raylm.executor.worker import Worker

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = 60.0  # waiting longer than this for CPUs means the cluster is too small
STARTUP_TIMEOUT_S = 300.0  # model load on every worker
POLL_S = 1.0  # how often a wait re-checks for dead workers


class WorkerDiedError(RuntimeError):
    """A worker actor of this replica failed; the engine cannot continue."""


class StepFuture:
    """One in-flight step: `result()` waits for every worker's part, returns the driver's."""

    def __init__(self, executor: "RayExecutor", refs: List[Any]) -> None:
        self.executor, self.refs = executor, refs

    def result(self) -> ModelRunnerOutput:
        ex = self.executor
        return ex._wait(self.refs, ex.config.scheduler.step_timeout_s)[ex.driver_rank]


class RayExecutor(Executor):
    def __init__(self, config, model_path: str) -> None:
        super().__init__(config, model_path)
        import ray

        if not ray.is_initialized():
            ray.init()  # joins $RAY_ADDRESS if set, else starts a local cluster
        par = config.parallel
        self.world = par.world_size
        self.driver_rank = (par.pipeline_parallel_size - 1) * par.tensor_parallel_size
        self._own_pg = None
        self.group_id = uuid.uuid4().hex[:8]
        self.bundle = worker_bundle(par.worker_num_cpus, config.model.device)
        pg, first = self._placement_group()
        self.workers = [self._start_worker(pg, first + rank, rank) for rank in range(self.world)]
        self.rendezvous = self._wait([self.workers[0].rendezvous_address.remote()],
                                     STARTUP_TIMEOUT_S)[0]

    def init_device_args(self):
        return (self.rendezvous,)

    # ---- placement ---------------------------------------------------------------

    def _placement_group(self):
        """(placement group, index of the first worker bundle)."""
        import ray
        from ray.util import get_current_placement_group
        from ray.util.placement_group import placement_group

        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) > self.world:
            return current, len(current.bundle_specs) - self.world  # a Serve replica's bundles
        strategy = group_strategy(self.config.model.device,
                                  self.config.parallel.pipeline_parallel_size)
        pg = placement_group([self.bundle] * self.world, strategy=strategy)
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            free = {k: ray.available_resources().get(k, 0) for k in self.bundle}
            raise RuntimeError(
                f"cannot place {self.world} workers x {self.bundle} ({strategy}) within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s: the cluster has {free} free (lower worker_num_cpus "
                "or add nodes)")
        self._own_pg = pg
        return pg, 0

    def _start_worker(self, pg, bundle: int, rank: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle)
        # named so operators (and the fault tests) can find a replica's workers in `ray list
        # actors`
        actor = ray.remote(Worker).options(num_cpus=self.bundle["CPU"],
                                           num_gpus=self.bundle.get("GPU", 0),
                                           scheduling_strategy=strategy, max_restarts=0,
                                           name=f"raylm_worker:{self.group_id}:{rank}")
        return actor.remote(self.config, self.model_path, rank)

    # ---- calls ------------------------------------------------------------------------

    def collective_rpc(self, method: str, args: Sequence[Any] = (),
                       timeout: float = None) -> List[Any]:
        return self._wait([getattr(w, method).remote(*args) for w in self.workers], timeout)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(sched).result()

    def execute_model_async(self, sched: SchedulerOutput) -> StepFuture:
        """Submit a step without waiting (pipeline parallelism keeps several in flight);
        each worker runs its steps in submission order."""
        import ray

        ref = ray.put(sched)
        return StepFuture(self, [w.execute_model.remote(ref) for w in self.workers])

    def _wait(self, refs: List[Any], timeout: float = None) -> List[Any]:
        """Every ref's value, in order; WorkerDiedError as soon as any worker fails."""
        import time

        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        # = worker rank when there is one ref per worker
        position = {ref: i for i, ref in enumerate(refs)}
        values: List[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            for ref in ready:  # each value is fetched once, as it arrives
                try:
                    values[position[ref]] = ray.get(ref)
                except Exception as exc:
                    self._fail(position[ref], exc)
            if deadline is not None and time.monotonic() > deadline and pending:
                late = sorted(position[r] for r in pending)
                self._fail(-1,
                           TimeoutError(f"worker(s) {late} did not answer within {timeout:g} s "
                                        "(stuck)"))
        return values

    def _fail(self, rank: int, exc: BaseException):
        self.shutdown()
        who = f"worker rank {rank}" if rank >= 0 else "the workers"
        raise WorkerDiedError(f"{who} of this replica failed ({type(exc).__name__}: {exc}); "
                              "the engine cannot continue") from exc

    def check_health(self) -> None:
        self.collective_rpc("ping", timeout=30.0)

    def shutdown(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w)
            except Exception:  # already dead
                pass
        self.workers = []
        if self._own_pg is not None:
            ray.util.remove_placement_group(self._own_pg)
            self._own_pg = None
