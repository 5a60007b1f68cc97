"""Elastic scaling of the DP replica set while serving, and targeted DP routing.

POST /scale_elastic_ep {"new_data_parallel_size": N, "timeout": T, "drain_timeout": S}
(vLLM's route; an admin route: only the admin key opens it): check N against the bounds
(the operator's cap, what the cluster's resources hold, one EP rank per expert) before
anything changes (400); claim the one scale allowed at a time at the DP coordinator (409);
expert-parallel apps then answer new generation requests 503 + Retry-After and wait until
no request is in flight (S seconds at most, else 408 and the app stays as it was); dense
apps keep serving. Set Serve's target replica count (its external-scaler API) and, for
expert-parallel apps, let the coordinator form the next generation of the DP group; 200
once N replicas serve. Past T seconds: the target goes back to the old size and the answer
is 504 naming what was missing. The scale runs in a task of its own, so a caller that
leaves does not stop it half-way. POST /is_scaling_elastic_ep answers vLLM's flag and the
scale's progress.

The header X-data-parallel-rank (vLLM's) pins a request to one DP replica.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raylm.serve.errors import APIError, error_response, unavailable

logger = logging.getLogger(__name__)

POLL_S = 0.2

# the X-data-parallel-rank of the request being handled (None: route by load)
dp_rank_hint: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("dp_rank_hint",
                                                                             default=None)


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # an admin action: "2", 2.0 or true are refused
    new_data_parallel_size: int = Field(gt=0, strict=True)
    drain_timeout: float = Field(default=120.0, gt=0)  # expert-parallel apps: in-flight requests
    # the resize; default: the app's scale_timeout
    timeout: Optional[float] = Field(default=None, gt=0)


@dataclass
class ScaleLimits:
    """What bounds a scale: the operator's cap, one replica's resource demand (what Ray must
    place per replica), and how long a resize may take before it is rolled back."""

    max_data_parallel_size: Optional[int] = None
    replica_resources: Dict[str, float] = field(default_factory=dict)
    scale_timeout_s: float = 300.0


class ElasticScaler:
    def __init__(self, client, app_name: str, limits: Optional[ScaleLimits] = None,
                 deployment: str = "LLMServer") -> None:
        self.client = client  # raylm.serve.ingress.ServeEngineClient
        self.app_name, self.deployment = app_name, deployment
        self.limits = limits or ScaleLimits()
        self.progress: Optional[Dict[str, Any]] = None  # the scale in progress here, if any
        self.target: Optional[int] = None  # the replica count last set (None: not known yet)
        self.guarding = False  # expert-parallel scales refuse generation requests (503) meanwhile

    async def scale(self, req: ScaleRequest) -> JSONResponse:
        """Check bounds, claim the scale, run it in a task of its own (a client that leaves
        does not stop it half-way: it finishes or rolls back within its timeout) and answer."""
        coordinator = await self.client.coordinator()
        expert_parallel = (await coordinator.control.remote())["target"] is not None
        self._check_size(req.new_data_parallel_size, expert_parallel)
        if not await coordinator.begin_scale.remote(req.new_data_parallel_size):
            raise APIError(409, "a scale is already in progress", code="scaling_in_progress")
        task = asyncio.get_running_loop().create_task(self._run(coordinator, req, expert_parallel))
        return await asyncio.shield(task)

    def _check_size(self, n: int, expert_parallel: bool) -> None:
        cap = self.limits.max_data_parallel_size
        if cap is not None and n > cap:
            raise _too_big(n, f"max_data_parallel_size={cap}")
        fits = cluster_capacity(self.limits.replica_resources)
        if fits is not None and n > fits[0]:
            raise _too_big(n, f"the cluster holds at most {fits[0]} replicas ({fits[1]})")
        if expert_parallel and n * self.client.tp_size > self.client.num_experts:
            raise _too_big(n,
                           f"x tp {self.client.tp_size} exceeds the model's "
                           f"{self.client.num_experts} experts (each EP rank needs one)")

    async def _run(self, coordinator, req: ScaleRequest, expert_parallel: bool) -> JSONResponse:
        n, old = req.new_data_parallel_size, self.target or len(await self.client.stats())
        self.progress = {"from": old, "to": n,
                         "phase": "draining" if expert_parallel else "resizing", "serving": old,
                         "since": time.time()}
        self.guarding = expert_parallel
        try:
            if expert_parallel and not await self._drain(coordinator, req.drain_timeout):
                return error_response(APIError(408,
                                               f"requests still in flight after drain_timeout "
                                               f"{req.drain_timeout:g} s; the app stays at its "
                                               "old size", code="drain_timeout"))
            await self._resize(coordinator, old, n, req.timeout or self.limits.scale_timeout_s)
            self.target = n
        except APIError as err:
            return error_response(err)
        finally:
            self.progress, self.guarding = None, False
            await coordinator.end_scale.remote()
        return JSONResponse({"message": f"scaled to {n} data-parallel replicas",
                             "new_data_parallel_size": n})

    async def _drain(self, coordinator, timeout_s: float) -> bool:
        """True once nothing is in flight here and every replica reported idle since we started."""
        start, deadline = time.time(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, table = await coordinator.snapshot.remote(-1, 0.0)
            idle = all(s.get("num_running", 0) == 0 and s.get("num_waiting", 0) == 0
                       and not s.get("dp_running") and s.get("computed_at", 0) >= start
                       for s in table.values())  # lockstep: paused too
            if idle and self.client.num_inflight == 0:
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def _resize(self, coordinator, old: int, n: int, timeout_s: float) -> None:
        """Set the target and wait until n replicas serve (and, expert-parallel, the group has
        re-formed); past `timeout_s` set the target back to `old` and raise 504 naming what
        was missing."""
        self.progress["phase"] = "resizing"
        if await self._reach(coordinator, n, timeout_s):
            return
        missing = self._missing(n)
        self.progress["phase"] = "rolling back"
        restored = await self._reach(coordinator, old, timeout_s)
        again = "" if restored else ", not yet serving at that size (still rolling back)"
        raise APIError(504,
                       f"the scale to {n} did not finish within {timeout_s:g} s ({missing}); the "
                       f"target is back to {old}{again}", type="server_error",
                       code="scale_timeout")

    async def _reach(self, coordinator, n: int, timeout_s: float) -> bool:
        await self._set_replicas(n)
        await coordinator.set_target.remote(n)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            control = await coordinator.control.remote()
            serving = len(await self.client.stats())
            self.progress.update(serving=serving, group_formed=control["formed"])
            grouped = control["target"] is None or (control["formed"] and len(control["ranks"])
                                                    == n)
            if serving == n and grouped:
                return True
            await coordinator.set_target.remote(n)  # drops members that went silent
            await asyncio.sleep(POLL_S)
        return False

    def _missing(self, n: int) -> str:
        p = self.progress
        text = f"{p['serving']} of {n} replicas serving; the others were not placed or not ready"
        return text + ("" if p.get("group_formed", True)
                       else "; the expert-parallel group had not re-formed")

    async def _set_replicas(self, n: int) -> None:
        from ray import serve
        from ray.serve._private.common import DeploymentID

        controller = serve.context._get_global_client()._controller
        deployment = DeploymentID(name=self.deployment, app_name=self.app_name)
        await controller.update_deployment_replicas.remote(deployment, n)

    def status(self) -> Dict[str, Any]:
        """/is_scaling_elastic_ep: vLLM's flag, and where the scale in progress stands."""
        p = self.progress
        progress = None if p is None else {**p, "elapsed_s": round(time.time() - p["since"], 1)}
        return {"is_scaling_elastic_ep": p is not None, "progress": progress}


def _too_big(n: int, limit: str) -> APIError:
    return APIError(400, f"new_data_parallel_size {n} exceeds {limit}",
                    param="new_data_parallel_size")


def cluster_capacity(replica_resources: Dict[str, float]) -> Optional[Tuple[int, str]]:
    """(replicas, why): how many replicas needing `replica_resources` the cluster can hold,
    from its resources as Ray reports them or, where an autoscaler publishes its node types x
    max counts (autoscaler v2, KubeRay), that maximum. None when nothing bounds it here: a
    replica needs no resources, or Ray's v1 autoscaler runs (it publishes no maximum; the
    scale's timeout then bounds the wait for nodes it may or may not add)."""
    import ray

    grown = _published_max_resources()
    if grown is None and _v1_autoscaler_running():
        return None
    total, best = ray.cluster_resources(), None
    for name, need in replica_resources.items():
        if need > 0:
            have = max(float(total.get(name, 0.0)), float((grown or {}).get(name) or 0))
            fits = int(have / need + 1e-9)
            if best is None or fits < best[0]:
                best = (fits, f"{have:g} {name} in the cluster / {need:g} per replica")
    return best


def _published_max_resources() -> Optional[Dict[str, float]]:
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: no answer is "not published"
        return None


def _v1_autoscaler_running() -> bool:
    """Whether the cluster's monitor runs an autoscaler over configured node types. Its status
    in the GCS names each node's type: a plain `ray start` has the read-only provider, which
    makes one type up per node (Ray's `format_readonly_node_type`) and never adds nodes."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler._private.util import format_readonly_node_type

        raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        types = report.get("node_type_mapping") or {}
        return any(kind != format_readonly_node_type(node) for node, kind in types.items())
    except Exception:  # private APIs: no answer is "no autoscaler" (the bound stays on)
        return False


class ScaleGuardMiddleware:
    """Pure ASGI: while a scale runs, generation routes get 503 + Retry-After; the header
    X-data-parallel-rank is parsed into `dp_rank_hint` (400 if not a non-negative integer)."""

    GUARDED = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, scaler: ElasticScaler) -> None:
        self.app, self.scaler = app, scaler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.GUARDED:
            return await self.app(scope, receive, send)
        if self.scaler.guarding:
            return await error_response(unavailable("The app is scaling; retry shortly.",
                                                    retry_after=2))(
                scope, receive, send)
        raw = dict(scope.get("headers") or []).get(b"x-data-parallel-rank")
        token = dp_rank_hint.set(None)
        try:
            if raw is not None:
                dp_rank_hint.set(_parse_rank(raw.decode("latin-1")))
            return await self.app(scope, receive, send)
        except APIError as err:
            return await error_response(err)(scope, receive, send)
        finally:
            dp_rank_hint.reset(token)


def _parse_rank(text: str) -> int:
    try:
        rank = int(text)
    except ValueError:
        rank = -1
    if rank < 0:
        raise APIError(400, f"X-data-parallel-rank must be a non-negative integer (got {text!r})",
                       param="X-data-parallel-rank")
    return rank


def add_elastic_routes(app: FastAPI, scaler: ElasticScaler) -> None:
    """The two routes; create the app with `middleware=[(ScaleGuardMiddleware, {"scaler":
    scaler})]`."""

    @app.post("/scale_elastic_ep")
    async def scale_elastic_ep(body: ScaleRequest) -> Any:
        return await scaler.scale(body)

    @app.post("/is_scaling_elastic_ep")
    async def is_scaling_elastic_ep() -> Dict[str, Any]:
        return scaler.status()
