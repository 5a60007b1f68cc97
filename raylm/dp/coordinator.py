"""DP coordinator: a deployment-scoped actor of the LLMServer deployment.

Every engine replica pushes its load (waiting, running, KV usage, counters) here when it
changes, at most every ~100 ms. Request routers long-poll `snapshot()` and get the new
table as soon as it changes. The coordinator never sits on the request path: if it dies,
routers keep their last table plus their own optimistic counts until Serve recreates it.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, Optional, Tuple

import ray


class DPCoordinator:
    def __init__(self) -> None:
        self.stats: Dict[str, Dict[str, Any]] = {}  # replica key -> latest stats
        self.version = 0
        self._changed = asyncio.Event()

    def identity(self) -> Tuple[str, str]:
        """(actor name, namespace): how routers outside the deployment find this actor.
        Serve registers deployment-scoped actors in its own namespace, not the job's."""
        from ray.serve._private.constants import SERVE_NAMESPACE

        return ray.get_runtime_context().get_actor_name(), SERVE_NAMESPACE

    async def report(self, replica_key: str, stats: Dict[str, Any]) -> None:
        self.stats[replica_key] = {**stats, "reported_at": time.time()}
        self._bump()

    async def remove(self, replica_key: str) -> None:
        if self.stats.pop(replica_key, None) is not None:
            self._bump()

    async def snapshot(self, known_version: int = -1, timeout_s: float = 1.0) -> Tuple[int, Dict[str, Dict]]:
        """Long poll: returns at once if the table changed since `known_version`, else when
        it next changes or after `timeout_s`."""
        if known_version == self.version:
            event = self._changed
            try:
                await asyncio.wait_for(event.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.version, dict(self.stats)

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()  # waiters hold the old (set) event; new waiters the new one


def score(stats: Optional[Dict[str, Any]]) -> int:
    """Load score of one engine (lower is better): queued work weighs 4x running work."""
    if not stats:
        return 0
    return 4 * int(stats.get("num_waiting", 0)) + int(stats.get("num_running", 0))
