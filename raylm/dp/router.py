"""A Serve request router for the DP engine replicas: a routing policy (raylm.dp.policies;
least-loaded by default) chooses among them on load scores and prefix-cache summaries.

Score = waiting * 4 + running, from the DP coordinator's table (long-polled, so it is
fresh within ~100 ms), corrected by what this router saw since that replica's last
report: a request it routed there counts as waiting (+4, as in vLLM's DP balancer), so a
burst does not all land on the replica that looked idle a moment ago; a request that
completed there takes back what it added (-4), or, if a report already counted it, the
running slot the report most likely gave it (-1), so a replica that just finished is not
mistaken for a busy one. Reports carry when they were computed; only requests routed well
before that count as included in them (an engine that was mid-step when a burst arrived
reports late, with stale counts). The policy's choice is the only first-rank replica, so
Serve's queue-length probing cannot override it.

A request counts at its replica from the moment it is chosen: Serve confirms a routing
(on_request_routed) only after a round trip to the replica, and every request of a burst
chosen meanwhile would otherwise see the same scores (16 concurrent requests split 13/3).
A request pinned to a DP rank goes to that rank (waiting up to 5 s for the ranks of replicas
that have not reported yet: just after start, a pin was once routed by load to the wrong
rank); if no replica has it (it died since the ingress checked), it is routed by load: waiting here
would block every request behind it (Serve fulfils pending requests in order; measured: a kill
test's replica came back after 92 s instead of 16 s, with a tenth of the requests served).

A choice serves the request it was made for (found by identity, not FIFO and not by id):
FIFOMixin hands it to the oldest pending request, whatever rank that one is pinned to (the
kill test caught requests pinned to the survivor dying on the killed replica), and Serve's
default matches by internal request id, which every handle call made while serving one
HTTP request shares (a multi-prompt completion's later prompts then waited forever). For
the same reason the bookkeeping keys choices by request object and keeps a list of routings
per request id.

The candidates are engines, not Serve replicas: a replica hosting several simulated engines
(raylm.serve.llm_server) has one coordinator entry per engine, each with its own DP rank;
the router scores and counts each, and names the chosen one in the call (`engine_index`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import ray
from ray.serve.request_router import (PendingRequest, ReplicaID, ReplicaResult, RequestRouter,
                                      RunningReplica)

from raylm.dp.coordinator import over_held_summary, score
from raylm.dp.policies import Candidate, create_routing_policy

logger = logging.getLogger(__name__)

WAITING_WEIGHT = 4  # matches score(): a queued request weighs 4 running ones
REPORT_LAG_S = 0.1  # a request routed this long before a report was computed is in it
CHOSEN_TTL_S = 30.0  # a choice Serve never confirmed (rejected, cancelled) stops counting then
PIN_WAIT_S = 5.0  # a pinned request waits this long for a starting replica's rank to be known


@dataclass
class _Routed:
    """A request Serve routed to engine `key`; `weight` is what it adds to that score."""
    key: str
    weight: int
    at: float
    replica: Optional[str] = None  # the Serve replica hosting it (None: the same as `key`)


class DPRouter(RequestRouter):
    def initialize_state(self, policy: str = "least_loaded", poll_timeout_s: float = 1.0,
                         **options) -> None:
        """Serve calls this with the deployment's `request_router_kwargs`: the policy's name
        and its options."""
        self.policy = create_routing_policy(policy, **options)
        self._poll_timeout_s = poll_timeout_s
        self._table: Dict[str, Dict] = {}
        self._version = -1
        # correction per replica since its last report
        self._delta: Dict[str, int] = defaultdict(int)
        self._outstanding: Dict[str, List[_Routed]] = defaultdict(list)  # by internal request id
        # id(pending request) -> (it, replica key, when): chosen, not yet confirmed by Serve
        self._chosen: Dict[int, Tuple[PendingRequest, str, float]] = {}
        self._poller: Optional[asyncio.Task] = None
        self._host: Dict[str, str] = {}  # engine key -> its Serve replica's (when they differ)
        self._hosted_table: Optional[Dict] = None  # the table `_hosted_keys` was computed from
        self._hosted_keys: Dict[str, List[str]] = {}

    def replica_score(self, replica: RunningReplica) -> int:
        """A replica's score, by its own entry (one engine) or Serve's stats as the fallback."""
        return self._score(replica.replica_id.unique_id, replica.routing_stats)

    def _score(self, key: str, fallback: Optional[Dict] = None) -> int:
        stats = self._table.get(key) or fallback  # table first; Serve's poll as fallback
        return max(0, score(stats) + self._delta[key])

    async def choose_replicas(
            self, candidate_replicas: List[RunningReplica],
            pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._ensure_poller(candidate_replicas)
        pinned = await self._wait_for_pinned(candidate_replicas, pending_request)
        prompt = (pending_request.kwargs.get("prompt_token_ids", ()) if pending_request is not None
                  else ())
        ranked = pinned or self.policy.order(self._candidates(candidate_replicas), prompt)
        first = ranked[0]
        self._choose(pending_request, first.key)
        if pending_request is not None and first.key != first.replica.replica_id.unique_id:
            pending_request.kwargs["engine_index"] = first.engine  # one of several engines there
        # One replica in the first rank, the rest as fallbacks should it refuse: Serve's
        # queue-length probing must not override the policy.
        rest, seen = [], {id(first.replica)}
        for c in ranked[1:]:
            if id(c.replica) not in seen:
                seen.add(id(c.replica))
                rest.append(c.replica)
        return [[first.replica], rest] if rest else [[first.replica]]

    def _candidates(self, replicas: List[RunningReplica]) -> List[Candidate]:
        """Every engine of `replicas` in the table; a replica not in it yet counts as one."""
        hosted = self._hosted()
        out = []
        for r in replicas:
            for key in hosted.get(r.replica_id.unique_id) or [r.replica_id.unique_id]:
                stats = self._table.get(key) or r.routing_stats or {}
                summary = stats.get("prefix_blocks") or frozenset()
                out.append(Candidate(key, self._score(key, r.routing_stats), summary,
                                     stats.get("block_size"), r, stats.get("engine_index"),
                                     stats.get("dp_rank")))
        return out

    def _hosted(self) -> Dict[str, List[str]]:
        """Serve replica key -> its engines' keys in the table (computed once per table)."""
        if self._hosted_table is not self._table:
            self._hosted_table, self._hosted_keys, self._host = self._table, defaultdict(list), {}
            for key, stats in self._table.items():
                self._host[key] = stats.get("replica", key)
                self._hosted_keys[self._host[key]].append(key)
        return self._hosted_keys

    def _pinned(self, replicas: List[RunningReplica],
                pending: Optional[PendingRequest]) -> List[Candidate]:
        """Engines matching the request's `data_parallel_rank` hint (vLLM's targeted DP
        routing, HTTP header X-data-parallel-rank); empty when there is no hint."""
        rank = pending.kwargs.get("data_parallel_rank") if pending is not None else None
        if rank is None:
            return []
        return [c for c in self._candidates(replicas) if c.rank == rank]

    async def _wait_for_pinned(self, replicas: List[RunningReplica],
                               pending: Optional[PendingRequest]) -> List[Candidate]:
        """`_pinned`, but while a candidate's rank is still unknown (a replica that has not
        reported yet: right after start), wait up to PIN_WAIT_S for it rather than route a
        pinned request by load to another rank."""
        deadline = time.monotonic() + PIN_WAIT_S
        while True:
            pinned = self._pinned(replicas, pending)
            if pinned or pending is None or pending.kwargs.get("data_parallel_rank") is None:
                return pinned
            if all(c.rank is not None
                   for c in self._candidates(replicas)) or time.monotonic() > deadline:
                return []
            self._ensure_poller(replicas)
            await asyncio.sleep(0.05)  # the coordinator's table arrives by long poll

    def _fulfill_next_pending_request(self, replica: RunningReplica,
                                      request_metadata=None) -> None:
        """Give `replica` to the pending request it was chosen for (see the module doc)."""
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                self._remove_pending_request_from_indices(pr)
                return

    def _choose(self, pending: Optional[PendingRequest], key: str) -> None:
        """Count the request at `key` now, before Serve confirms it (see the module doc)."""
        now = time.time()
        # never confirmed: refused or cancelled
        for handle, (_, _, at) in list(self._chosen.items()):
            if now - at > CHOSEN_TTL_S:
                self._unchoose(handle)
        if pending is None:
            return
        self._unchoose(id(pending))  # chosen again after a refusal
        self._chosen[id(pending)] = (pending, key, now)  # holds it, so its id stays unique
        self._delta[key] += WAITING_WEIGHT

    def _unchoose(self, handle: int) -> None:
        _, key, _ = self._chosen.pop(handle, (None, None, 0.0))
        if key is not None:
            self._delta[key] -= WAITING_WEIGHT

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        replica, rid = replica_id.unique_id, pending_request.metadata.internal_request_id
        _, chosen, _ = self._chosen.get(id(pending_request), (None, None, 0.0))
        # the engine chosen, if the request went to its replica (else a fallback took it)
        key = (chosen if chosen is not None and self._host.get(chosen, chosen) == replica
               else replica)
        self._unchoose(id(pending_request))  # the provisional count becomes the confirmed one
        self._delta[key] += WAITING_WEIGHT
        self._outstanding[rid].append(_Routed(key, WAITING_WEIGHT, time.time(), replica))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        key, routed = replica_id.unique_id, self._outstanding.get(internal_request_id, [])
        done = next((x for x in routed if (x.replica or x.key) == key), None)
        if done is None:  # routed before this router knew it (e.g. it restarted)
            self._delta[key] -= 1
            return
        routed.remove(done)
        if not routed:
            del self._outstanding[internal_request_id]
        self._delta[done.key] -= done.weight

    def _absorb_report(self, key: str, computed_at: float) -> None:
        """A fresh report from `key` counts the requests routed there well before it was
        computed (their weight becomes the running slot it gave them); requests routed since
        keep their +4, or a burst would pile onto a replica whose report predates it."""
        counted_before = computed_at - REPORT_LAG_S
        self._delta[key] = WAITING_WEIGHT * sum(1 for _, k, _ in self._chosen.values() if k == key)
        for x in (x for routed in self._outstanding.values() for x in routed if x.key == key):
            if x.at < counted_before:
                x.weight = 1
            else:
                self._delta[key] += x.weight

    # ---- coordinator table ------------------------------------------------------

    def _ensure_poller(self, replicas: List[RunningReplica]) -> None:
        if self._poller is not None and not self._poller.done():
            return
        identity = next((r.routing_stats.get("coordinator") for r in replicas
                         if r.routing_stats.get("coordinator")),
                        None)
        if identity is not None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(*identity))

    async def _poll(self, name: str, namespace: str) -> None:
        """Follow the coordinator's table until it goes away (then the next choose_replicas
        starts a new poller from fresh routing stats)."""
        coordinator = ray.get_actor(name, namespace=namespace)
        self._version = -1  # a new poller (or coordinator) starts from the whole table
        while True:
            try:
                version, changed, keys = await coordinator.changes.remote(self._version,
                                                                          self._poll_timeout_s)
            except Exception as exc:  # coordinator restarting: keep the last table
                logger.warning("DP coordinator unreachable (%s); routing on the last table", exc)
                return
            if version < self._version:  # a recreated coordinator counts from 0 again
                self._version = -1
            elif version != self._version:
                self._merge(changed, keys)
                self._version = version

    def _merge(self, changed: Dict[str, Dict], keys: List[str]) -> None:
        """Apply the coordinator's changes: new reports (an entry without a prefix summary
        keeps the one held), and replicas gone from its table."""
        table = {k: self._table[k] for k in keys if k in self._table}
        for key, stats in changed.items():
            if stats.get("reported_at") != table.get(key, {}).get("reported_at"):
                self._absorb_report(key, stats.get("computed_at", stats.get("reported_at", 0.0)))
            table[key] = over_held_summary(table.get(key, {}), stats)
        self._table = table
