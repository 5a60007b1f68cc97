"""Elastic scaling of the DP replica set while serving, and targeted DP routing.

POST /scale_elastic_ep {"new_data_parallel_size": N, "drain_timeout": S} (vLLM's route):
claim the one scale allowed at a time at the DP coordinator (409 if one runs); answer new
generation requests 503 + Retry-After from then on; wait until no request is in flight
anywhere (S seconds at most, else 408 and the app stays as it was); set Serve's target
replica count (Serve's external-scaler API: the app runs with external_scaler_enabled);
for expert-parallel apps the coordinator forms the next generation of the DP group and
every replica re-forms into it and reloads its experts; answer 200 once the new set
serves. POST /is_scaling_elastic_ep answers {"is_scaling_elastic_ep": bool}. Dense apps
take the same call: it only resizes the replica set.

The header X-data-parallel-rank (vLLM's) pins a request to one DP replica.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any, Dict, Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from raylm.serve.errors import APIError, error_response, unavailable

logger = logging.getLogger(__name__)

RESIZE_TIMEOUT_S = 600.0  # replicas to start (model load) or stop, and the group to re-form
POLL_S = 0.2

# the X-data-parallel-rank of the request being handled (None: route by load)
dp_rank_hint: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("dp_rank_hint", default=None)


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    new_data_parallel_size: int = Field(gt=0)
    drain_timeout: float = Field(default=120.0, gt=0)


class ElasticScaler:
    def __init__(self, client, app_name: str, deployment: str = "LLMServer") -> None:
        self.client = client  # raylm.serve.ingress.ServeEngineClient
        self.app_name, self.deployment = app_name, deployment
        self.scaling = False

    async def scale(self, req: ScaleRequest) -> JSONResponse:
        coordinator = await self.client.coordinator()
        control = await coordinator.control.remote()
        n = req.new_data_parallel_size
        if control["target"] is not None and n * self.client.tp_size > self.client.num_experts:
            raise APIError(400, f"new_data_parallel_size {n} x tp {self.client.tp_size} exceeds the model's "
                                f"{self.client.num_experts} experts (each EP rank needs one)",
                           param="new_data_parallel_size")
        if not await coordinator.begin_scale.remote(n):
            raise APIError(409, "a scale is already in progress", code="scaling_in_progress")
        self.scaling = True
        try:
            if not await self._drain(coordinator, req.drain_timeout):
                return error_response(APIError(408, f"requests still in flight after drain_timeout "
                                                     f"{req.drain_timeout:g} s; the app stays at its old size",
                                               code="drain_timeout"))
            await self._resize(coordinator, n)
        finally:
            self.scaling = False
            await coordinator.end_scale.remote()
        return JSONResponse({"message": f"scaled to {n} data-parallel replicas", "new_data_parallel_size": n})

    async def _drain(self, coordinator, timeout_s: float) -> bool:
        """True once nothing is in flight here and every replica reported idle since we started."""
        start, deadline = time.time(), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, table = await coordinator.snapshot.remote(-1, 0.0)
            idle = all(s.get("num_running", 0) == 0 and s.get("num_waiting", 0) == 0 and not s.get("dp_running")
                       and s.get("computed_at", 0) >= start for s in table.values())  # lockstep: paused too
            if idle and self.client.num_inflight == 0:
                return True
            await asyncio.sleep(POLL_S)
        return False

    async def _resize(self, coordinator, n: int) -> None:
        from ray import serve
        from ray.serve._private.common import DeploymentID

        controller = serve.context._get_global_client()._controller
        await controller.update_deployment_replicas.remote(DeploymentID(name=self.deployment, app_name=self.app_name), n)
        await coordinator.set_target.remote(n)
        deadline = time.monotonic() + RESIZE_TIMEOUT_S
        while time.monotonic() < deadline:
            control = await coordinator.control.remote()
            _, table = await coordinator.snapshot.remote(-1, 0.0)
            grouped = control["target"] is None or (control["formed"] and len(control["ranks"]) == n)
            if len(table) == n and grouped:
                return
            await coordinator.set_target.remote(n)  # drops members that went silent
            await asyncio.sleep(POLL_S)
        raise APIError(500, f"the replica set did not reach {n} within {RESIZE_TIMEOUT_S:.0f} s",
                       code="scale_failed")


class ScaleGuardMiddleware:
    """Pure ASGI: while a scale runs, generation routes get 503 + Retry-After; the header
    X-data-parallel-rank is parsed into `dp_rank_hint` (400 if not a non-negative integer)."""

    GUARDED = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, scaler: ElasticScaler) -> None:
        self.app, self.scaler = app, scaler

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.GUARDED:
            return await self.app(scope, receive, send)
        if self.scaler.scaling:
            return await error_response(unavailable("The app is scaling; retry shortly.", retry_after=2))(
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
    """The two routes; create the app with `middleware=[(ScaleGuardMiddleware, {"scaler": scaler})]`."""

    @app.post("/scale_elastic_ep")
    async def scale_elastic_ep(body: ScaleRequest) -> Any:
        return await scaler.scale(body)

    @app.post("/is_scaling_elastic_ep")
    async def is_scaling_elastic_ep() -> Dict[str, bool]:
        return {"is_scaling_elastic_ep": scaler.scaling}
