"""DP coordinator: a deployment-scoped actor of the LLMServer deployment.

Load: every engine replica pushes its load (waiting, running, KV usage, counters) here
when what routing reads changes (at most every ~100 ms; free blocks or the prefix summary
alone at most every 0.5 s unless the policy reads prefixes; at least every second); routers
long-poll `changes()` and get the entries that changed as soon as any does (only those:
at 64 replicas the whole table, prefix summaries included, is ~220 KiB to pickle per
change); `snapshot()` is the whole table, for occasional readers. The coordinator never
sits on the request path: if it dies, routers keep their last table plus their own
optimistic counts until Serve recreates it.

Expert parallelism over DP (MoE): it also hosts the TCP store where the replicas' DP
groups rendezvous, forms the group generation by generation (`join`, raylm.dp.membership),
relays wave starts and completions (raylm.dp.waves), and holds the elastic-scaling flag.
Replicas and ingresses follow all of that through one long poll, `watch()`.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Dict, List, Optional, Tuple

import ray

from raylm.dp.membership import Membership
from raylm.dp.waves import WaveTable

JOIN_TIMEOUT_S = 300.0  # a replica waits this long for the rest of its generation
STALE_REPORT_S = 30.0  # a replica silent this long (it reports every second) has gone
GONE_FROM_TABLE_S = 10.0  # metrics and rank checks leave out a replica silent this long (killed)
PREFIX_KEYS = ("prefix_blocks", "prefix_version")  # a replica's prefix summary, sent on change
# The calls every replica and router makes several times a second (reports, long polls) record
# no task events: each would be one more record for the GCS and the dashboard to take in, CPU
# that on a small machine comes off the engine's cores (issue 17). Rare calls keep theirs.
_periodic = ray.method(enable_task_events=False)


def over_held_summary(held: Dict[str, Any], stats: Dict[str, Any]) -> Dict[str, Any]:
    """`stats` (a new report) keeping `held`'s prefix summary where the report has none."""
    return {**{k: v for k, v in held.items() if k in PREFIX_KEYS}, **stats}


class _Broadcast:
    """A version number and a way to wait for it to move past a known one."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        # waiters hold the old (set) event; new waiters the new one
        self._changed = asyncio.Event()

    async def wait_past(self, known: int, timeout_s: float) -> None:
        if known == self.version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass


class DPCoordinator:
    def __init__(self) -> None:
        self.stats: Dict[str, Dict[str, Any]] = {}  # replica key -> latest stats
        # key -> (version of its last report, of its summary)
        self._changed: Dict[str, Tuple[int, int]] = {}
        self._stats = _Broadcast()
        self._control = _Broadcast()
        self.waves = WaveTable()
        self.membership: Optional[Membership] = None  # expert-parallel apps only
        self.scaling: Optional[Dict[str, Any]] = None  # the elastic scale in progress, if any
        self._store = None
        self._metrics = None

    @property
    def version(self) -> int:
        return self._stats.version

    def identity(self) -> Tuple[str, str]:
        """(actor name, namespace): how routers outside the deployment find this actor.
        Serve registers deployment-scoped actors in its own namespace, not the job's."""
        from ray.serve._private.constants import SERVE_NAMESPACE

        return ray.get_runtime_context().get_actor_name(), SERVE_NAMESPACE

    # ---- load table ----------------------------------------------------------------

    async def report(self, replica_key: str, stats: Dict[str, Any]) -> Optional[int]:
        """A replica's latest stats. Its prefix summary (`prefix_blocks`, raylm.dp.prefix)
        comes only when it changed: a report without one keeps the last. Returns the
        `prefix_version` held, so a replica re-sends a summary this coordinator lacks (one
        recreated since)."""
        return (await self.report_many({replica_key: stats}))[replica_key]

    @_periodic
    async def report_many(self, reports: Dict[str, Dict[str, Any]]) -> Dict[str, Optional[int]]:
        """`report` for several engines at once (a process hosting several simulated
        engines sends one call per tick); one version bump for all of them."""
        self._stats.bump()
        held = {}
        for key, stats in reports.items():
            self.stats[key] = {**over_held_summary(self.stats.get(key, {}), stats),
                               "reported_at": time.time()}
            summary_at = (self._stats.version if "prefix_blocks" in stats
                          else self._changed.get(key, (0, 0))[1])
            self._changed[key] = (self._stats.version, summary_at)
            held[key] = self.stats[key].get("prefix_version")
        self._export()
        return held

    async def remove(self, replica_key: str) -> None:
        """A replica is shutting down (scale-down, redeploy)."""
        self._changed.pop(replica_key, None)
        if self.stats.pop(replica_key, None) is not None:
            self._stats.bump()
        if self.membership is not None:
            self.membership.leave(replica_key)
            self._form()
            self._control.bump()

    @_periodic
    async def snapshot(self, known_version: int = -1,
                       timeout_s: float = 1.0) -> Tuple[int, Dict[str, Dict]]:
        """Long poll: returns at once if the table changed since `known_version`, else when
        it next changes or after `timeout_s`."""
        await self._stats.wait_past(known_version, timeout_s)
        return self._stats.version, dict(self.stats)

    @_periodic
    async def changes(self, known_version: int = -1,
                      timeout_s: float = 1.0) -> Tuple[int, Dict[str, Dict], List[str]]:
        """Long poll for routers: (version, the entries reported since `known_version`, every
        key in the table now). An entry carries its prefix summary only if that changed
        since `known_version` too; the reader keeps the one it has otherwise."""
        await self._stats.wait_past(known_version, timeout_s)
        changed = {}
        for key, (at, summary_at) in self._changed.items():
            if at > known_version:
                stats = self.stats[key]
                changed[key] = stats if summary_at > known_version else {
                    k: v for k, v in stats.items() if k not in PREFIX_KEYS}
        return self._stats.version, changed, list(self.stats)

    # ---- control: group, waves, scaling ---------------------------------------------

    @_periodic
    async def watch(self, known_version: int = -1,
                    timeout_s: float = 5.0) -> Tuple[int, Dict[str, Any]]:
        """Long poll on the control state (see `control()`)."""
        await self._control.wait_past(known_version, timeout_s)
        return self._control.version, self.control()

    def control(self) -> Dict[str, Any]:
        m = self.membership
        return {"wave": self.waves.wave, "running": self.waves.running,
                "waves_completed": self.waves.completed, "scaling": self.scaling,
                "generation": m.generation if m else 0, "ranks": dict(m.ranks) if m else {},
                "target": m.target if m else None, "formed": m.formed if m else True,
                "store": self._store_address() if m else None}

    async def join(self, replica_key: str, target: int) -> Dict[str, Any]:
        """An expert-parallel replica asks for its place in the DP group; returns once a
        generation including it has formed (the other replicas must join too). A member
        that went silent (crashed, so never said goodbye) is dropped meanwhile, so its
        replacement can take its place."""
        if self.membership is None:
            self.membership = Membership(target)
        self.membership.join(replica_key)
        self._control.bump()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while self.membership.rank_of(replica_key) is None:
            if time.monotonic() > deadline:
                self.membership.leave(replica_key)
                raise TimeoutError(f"the DP group did not reach {self.membership.target} replicas "
                                   f"in {JOIN_TIMEOUT_S:.0f} s")
            self._drop_silent()
            self._form()
            await self._control.wait_past(self._control.version, 1.0)
        return self.control()

    async def ready(self, replica_key: str, generation: int) -> None:
        """A replica has joined `generation`'s group (its workers connected)."""
        if self.membership is not None:
            self.membership.mark_ready(replica_key, generation)
            self._control.bump()

    async def wave_start(self, wave: int) -> None:
        """START_DP_WAVE: a replica got work while paused; every replica must step."""
        self.waves.start(wave)
        self._control.bump()
        self._export()

    async def wave_complete(self, wave: int) -> None:
        self.waves.complete(wave)
        self._control.bump()
        self._export()

    async def begin_scale(self, new_size: int) -> bool:
        """Claim the one scale allowed at a time; False if one is running."""
        if self.scaling is not None:
            return False
        self.scaling = {"new_data_parallel_size": new_size, "since": time.time()}
        self._control.bump()
        return True

    async def set_target(self, new_size: int) -> None:
        if self.membership is not None:
            self.membership.target = new_size
            self._drop_silent()
            self._form()

    async def end_scale(self) -> None:
        self.scaling = None
        self._control.bump()

    def _form(self) -> None:
        if self.membership is not None and self.membership.maybe_form():
            self.waves.running = False  # the new group starts paused, at the current wave
            self._control.bump()

    def _drop_silent(self) -> None:
        """While more replicas claim a place than the target allows, members that stopped
        reporting (killed without a goodbye) leave the group. (A member blocked re-forming
        does not report either, hence the long silence allowed.)"""
        m = self.membership
        if len(m.ranks) + len(m.joining) <= m.target:
            return
        now = time.time()
        for key in list(m.ranks):
            if now - self.stats.get(key, {}).get("reported_at", now) > STALE_REPORT_S:
                m.leave(key)
                self.stats.pop(key, None)

    def _store_address(self) -> Tuple[str, int]:
        """(host, port) of the TCP store the DP groups rendezvous at, started on first use."""
        if self._store is None:
            import torch.distributed as dist

            host = ray.util.get_node_ip_address()
            store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            self._store = (store, (host, store.port))  # keep the server object alive
        return self._store[1]

    def _export(self) -> None:
        """Lockstep gauges to the Ray dashboard (expert-parallel apps only)."""
        from raylm.dp.metrics import export_coordinator_metrics

        if self.membership is None:
            return
        try:
            self._metrics = export_coordinator_metrics(self._metrics, self.waves, self.stats)
        except Exception:  # metrics never break coordination
            pass


def score(stats: Optional[Dict[str, Any]]) -> int:
    """Load score of one engine (lower is better): queued work weighs 4x running work."""
    if not stats:
        return 0
    return 4 * int(stats.get("num_waiting", 0)) + int(stats.get("num_running", 0))
