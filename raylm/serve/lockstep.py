"""A replica's membership in the expert-parallel DP group (MoE with --dp > 1).

`LockstepMember` joins the DP coordinator's group before the engine is built (the engine's
workers need their DP rank and the group's store to load their experts), then follows the
coordinator's control state: START_DP_WAVE wakes a paused engine into dummy steps, and a
new generation of the group (elastic scaling, a replaced replica) re-forms this replica's
workers into it once the engine is paused and idle. The engine's wave starts and
completions go back to the coordinator as fire-and-forget actor calls.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Dict, Optional

import ray

logger = logging.getLogger(__name__)


class LockstepMember:
    def __init__(self, coordinator, replica_key: str, dp_size: int) -> None:
        self.coordinator, self.key = coordinator, replica_key
        group = ray.get(coordinator.join.remote(replica_key, dp_size))
        self.generation = group["generation"]
        self.rank, self.size = group["ranks"][replica_key], len(group["ranks"])
        self.group = group
        self.engine = None  # AsyncEngine, once built
        self._watcher: Optional[asyncio.Task] = None
        self._reforming = False
        self.experts = []  # the expert ids this replica's workers hold (all MoE layers)

    def parallel_fields(self) -> Dict[str, Any]:
        """ParallelConfig fields that place this replica's workers in the group."""
        return {"data_parallel_rank": self.rank, "data_parallel_size": self.size,
                "data_parallel_store": tuple(self.group["store"]),
                "data_parallel_group": f"g{self.generation}"}

    def attach(self, engine) -> None:
        """Hook the built engine's wave state up to the coordinator and report ready."""
        self.engine = engine
        waves = engine.waves
        waves.reset(self.group["wave"])
        waves.announce = self._announce
        self.experts = _held(engine.collective_rpc("local_experts"))
        self.coordinator.ready.remote(self.key, self.generation)

    def _announce(self, event: str, wave: int) -> None:
        if event == "start":
            self.coordinator.wave_start.remote(wave)
        else:
            self.coordinator.wave_complete.remote(wave)

    def ensure_watching(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        version = -1
        while True:
            try:
                version, control = await self.coordinator.watch.remote(version, 5.0)
            except Exception as exc:  # coordinator restarting: try again shortly
                logger.warning("DP coordinator unreachable: %s", exc)
                await asyncio.sleep(1.0)
                continue
            self.on_control(control)

    def on_control(self, control: Dict[str, Any]) -> None:
        waves = self.engine.waves
        if control["generation"] > self.generation and self.key in control["ranks"]:
            self._reform_when_idle(control)
        elif control["running"] and waves.on_start(control["wave"]):
            self.engine.wake()  # dummy steps until the wave ends

    def _reform_when_idle(self, control: Dict[str, Any]) -> None:
        if self._reforming:
            return
        self._reforming = True

        def reform() -> None:
            engine = self.engine
            if engine.waves.running or engine.has_scheduled_requests():
                self._reforming = False  # not drained yet: the next control update retries
                asyncio.get_running_loop().call_later(0.1, self._reform_when_idle, control)
                return
            self.generation, self.group = control["generation"], control
            self.rank, self.size = control["ranks"][self.key], len(control["ranks"])
            held = engine.collective_rpc("reform_expert_dp",
                                         (self.rank, self.size, tuple(control["store"]),
                                          f"g{self.generation}"))
            self.experts = _held(held)
            engine.waves.reset(control["wave"])
            self._reforming = False
            self.coordinator.ready.remote(self.key, self.generation)
            logger.info("re-formed into DP group generation %d as rank %d of %d",
                        self.generation, self.rank, self.size)

        self.engine.call_between_steps(reform)


def _held(per_worker) -> list:
    """Expert ids held by any of the replica's workers (each answers {MoE layer: ids})."""
    return sorted({e for layers in per_worker for experts in layers.values() for e in experts})
