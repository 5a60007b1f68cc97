"""Serve application builder for the OpenAI endpoint. All three start the same app:

    raylm serve --model M --dp 2
    serve run deployments/raylm.yaml
    serve run raylm.deployments.openai:build_app model=M dp=2

The app: OpenAIIngress (FastAPI) -> LLMServer x dp (one AsyncEngine each), routed by
DPRouter from the DP coordinator (a deployment-scoped actor of LLMServer).
"""
from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

import psutil
from pydantic import ConfigDict, Field, PositiveInt, model_validator

from raylm.config import EngineConfig, default_admin_api_key, default_api_key, usable_cores
from raylm.dp.policies import ROUTING_POLICIES
from raylm.executor.placement import group_strategy, placement_device, worker_bundle
from raylm.models.loader import checkpoint_bytes
from raylm.options import EngineArgs
from raylm.serve.middleware import OPEN_PATHS
from raylm.serve.tool_parsers import tool_parser_names

# non-generation requests (health, metrics, tokenize) beside the admission bound
INGRESS_HEADROOM = 64
INGRESS_SHUTDOWN_MARGIN_S = 10.0
# The ingress's handlers run on its replica's own event loop, where Serve's direct ingress
# serves HTTP: every streamed chunk would otherwise hop threads (a wake-up of the other loop
# per message). Its handlers never block, so the loop stays responsive (issue 17).
INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
AUTO_DP_MAX = 8  # `dp auto` starts at most this many replicas (processes, KV pools, channels)
REPLICA_OVERHEAD_BYTES = 1 << 30  # a CPU replica besides its weights: torch, Ray's worker (~1 GiB)


def auto_dp(weight_bytes: Optional[int], cores: int, available_bytes: int) -> int:
    """`dp auto` for CPU replicas without TP/PP: one per core (at most AUTO_DP_MAX) while they
    fit in 60% of available memory, each counted at twice its checkpoint (weights and the
    GEMV's plain copy) plus REPLICA_OVERHEAD_BYTES; 1 when the checkpoint size is unknown.
    On 2 cores dp 2 serves more than dp 1 at load (README, "Decisions worth knowing")."""
    if not weight_bytes:
        return 1
    fit = int(0.6 * available_bytes) // (2 * weight_bytes + REPLICA_OVERHEAD_BYTES)
    return max(1, min(cores, AUTO_DP_MAX, fit))


class ServeArgs(EngineArgs):
    """The builder's options: every engine option (raylm.options, declared once in
    raylm.config) plus the serving ones below, which is what `raylm serve` flags and YAML
    `args:` hold (underscored). Strings from `serve run k=v` are coerced by pydantic."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    served_model_name: Optional[str] = Field(None,
                                             description="the model's name in the API (default: "
                                                         "--model)")
    dp: Union[PositiveInt, Literal["auto"]] = Field(
        "auto",
        description="data-parallel engine replicas; auto: on CPU without TP/PP/EP, one per core "
                    f"(at most {AUTO_DP_MAX}) while their weights fit in memory, else 1")
    num_cpus_per_replica: Optional[float] = Field(
        None, ge=0,
        description="CPUs Ray reserves for each engine replica; on CPU without TP/PP also the "
                    "threads its model runs on (default: there, this machine's cores over dp; "
                    "else 1)")
    share_cores: bool = Field(
        True,
        description="CPU engines without TP/PP on one node lend each other their cores: one busy "
                    "alone runs on every engine's share, several split them "
                    "(raylm.executor.cpu_share)")
    routing_policy: Literal[tuple(ROUTING_POLICIES)] = Field(
        "least_loaded",
        description="how requests pick an engine replica: " + ", ".join(ROUTING_POLICIES)
        + " (raylm.dp.policies)")
    prefix_max_imbalance: int = Field(
        2, ge=0,
        description="prefix_aware routing: how far above the lowest load score (waiting*4 + "
                    "running) a replica holding the prompt's prefix may be and still get it")
    engines_per_replica: int = Field(
        1, gt=0,
        description="sim executor only: engines each replica process hosts, each its own DP rank "
                    "(a fleet of dp x this on a small machine)")
    placement_strategy: Optional[Literal["PACK", "STRICT_PACK", "SPREAD",
                                         "STRICT_SPREAD"]] = Field(
        None,
        description="a TP/PP replica's placement group strategy (default: STRICT_PACK for a CUDA "
                    "TP group, PACK otherwise); STRICT_SPREAD puts the replica and each stage on "
                    "its own node")
    max_replicas_per_node: Optional[int] = Field(
        None, gt=0,
        description="engine replicas per node at most, for replicas without TP/PP (Serve's "
                    "option; 1: one per node)")
    # Serve autoscaling of the dense DP replica set, in Serve's own shape (min_replicas,
    # max_replicas, target_ongoing_requests, upscale_delay_s, ...); replaces a fixed dp.
    # `raylm serve --autoscale MIN:MAX` fills it.
    autoscaling_config: Optional[Dict[str, Any]] = None
    # The engine's default is unbounded (the offline LLM queues all its prompts at once).
    max_waiting_requests: Optional[int] = Field(
        256, gt=0,
        description="requests waiting in each replica's queue; past it 429 + Retry-After")
    # kept out of repr (and logs)
    api_key: Optional[str] = Field(
        default_factory=default_api_key, repr=False,
        description="require 'Authorization: Bearer KEY' on every route but --open-paths "
                    "(default: $RAYLM_API_KEY, which keeps the key out of the process list)")
    open_paths: List[str] = Field(
        default_factory=lambda: list(OPEN_PATHS),
        description="routes open without the key (default: /health /ping /version; add /metrics "
                    "to open it)")
    max_body_bytes: int = Field(1 << 20, gt=0, description="larger request bodies get 413")
    tool_call_parser: Literal[tuple(tool_parser_names())] = Field(
        "hermes",
        description="how tool calls are read out of the model's text on chat with tools: "
        + ", ".join(tool_parser_names()) + " (raylm.serve.tool_parsers)")
    max_ongoing_requests: int = Field(
        1024, gt=0, description="engine requests in flight in the app; past it 429 + Retry-After")
    request_timeout: Optional[float] = Field(
        None, gt=0,
        description="abort a request this many seconds after it arrived (408); default: no limit")
    shutdown_timeout: float = Field(
        30.0, ge=0,
        description="on SIGTERM (or a redeploy), seconds in-flight requests get to finish (new "
                    "ones get 503); then the rest are cut off with an error")
    # Elastic scaling (POST /scale_elastic_ep); a request may set its own `timeout`.
    admin_api_key: Optional[str] = Field(
        default_factory=default_admin_api_key, repr=False,
        description="key of the admin routes (/scale_elastic_ep, /is_scaling_elastic_ep), "
                    "separate from --api-key (default: $RAYLM_ADMIN_API_KEY); without one those "
                    "routes answer 404")
    max_data_parallel_size: Optional[int] = Field(
        None, gt=0,
        description="the most replicas an elastic scale may ask for (besides what the cluster "
                    "holds)")
    scale_timeout: float = Field(
        300.0, gt=0,
        description="an elastic scale not serving at its new size after this many seconds is "
                    "rolled back")

    @model_validator(mode="after")
    def _resolve_dp(self) -> "ServeArgs":
        """`dp auto` becomes a number here, before any check reads it."""
        if self.dp == "auto":
            self.dp = self._auto_dp()
        return self

    @model_validator(mode="after")
    def _check_autoscaling(self) -> "ServeArgs":
        if self.autoscaling_config is not None:
            lo, hi = (self.autoscaling_config.get("min_replicas", 1),
                      self.autoscaling_config.get("max_replicas"))
            if hi is None or not 0 <= lo <= hi or hi < 1:
                raise ValueError("autoscaling_config needs 0 <= min_replicas <= max_replicas, "
                                 f"max >= 1 (got {self.autoscaling_config})")
            if self.enable_expert_parallel:
                raise ValueError("autoscaling_config is for dense/TP replicas: expert-parallel "
                                 "replica sets resize through elastic scaling")
        if (self.max_data_parallel_size is not None
                and self.max_replicas > self.max_data_parallel_size):
            raise ValueError(f"dp {self.max_replicas} exceeds "
                             f"max_data_parallel_size {self.max_data_parallel_size}")
        if self.engines_per_replica > 1 and (self.distributed_executor_backend != "sim"
                                             or self.enable_expert_parallel):
            raise ValueError("engines_per_replica > 1 needs the sim executor (--executor sim), "
                             "without expert parallelism")
        grouped = self.tp * self.pp > 1
        if self.placement_strategy and not grouped:
            raise ValueError("placement_strategy places a TP/PP replica's workers: it needs tp or "
                             "pp > 1")
        if self.max_replicas_per_node and grouped:  # Serve refuses it with placement group bundles
            raise ValueError("max_replicas_per_node is for replicas without TP/PP; place TP/PP "
                             "replicas with placement_strategy")
        if self.enable_expert_parallel and self.dp > 1 and self.pp > 1:
            raise ValueError("expert parallelism across DP replicas needs pp=1 (lockstep runs one "
                             "batch per step)")
        return self

    def _auto_dp(self) -> int:
        """What `dp auto` means for these options, on the machine that builds the app."""
        if (placement_device(self.device) != "cpu" or self.tp * self.pp > 1
                or self.enable_expert_parallel or self.distributed_executor_backend == "sim"
                or self.autoscaling_config is not None):
            return 1
        dp = auto_dp(checkpoint_bytes(self.model), usable_cores(),
                     psutil.virtual_memory().available)
        return min(dp, self.max_data_parallel_size or dp)

    def engine_config(self) -> EngineConfig:
        """The engine options, with the replica count the default KV budget is split over."""
        return super().engine_config(data_parallel_size=self.max_replicas)

    def router_kwargs(self) -> Dict[str, Any]:
        """DPRouter's options: the policy and what it takes."""
        if self.routing_policy == "prefix_aware":
            return {"policy": self.routing_policy, "max_imbalance": self.prefix_max_imbalance}
        return {"policy": self.routing_policy}

    @property
    def tp(self) -> int:
        return self.tensor_parallel_size

    @property
    def pp(self) -> int:
        return self.pipeline_parallel_size

    def replica_placement(self) -> Dict[str, Any]:
        """Deployment options placing a replica. Without TP/PP the replica runs the model
        itself (one GPU on CUDA). With TP/PP, a placement group whose bundle 0 is the replica
        and bundles 1..tp*pp its workers, one GPU each on CUDA (the RayExecutor uses them in
        order); PACK keeps a replica's workers on one node when they fit, STRICT_PACK makes
        a CUDA TP group share a node, unless `placement_strategy` says otherwise."""
        world = self.tp * self.pp
        if world == 1:
            alone = worker_bundle(self.replica_cpus, self.device)
            spread = ({"max_replicas_per_node": self.max_replicas_per_node}
                      if self.max_replicas_per_node else {})
            return {"ray_actor_options": {"num_cpus": alone["CPU"],
                                          "num_gpus": alone.get("GPU", 0)}, **spread}
        replica = {"CPU": max(self.replica_cpus, 0.01)}  # an empty bundle is not allowed
        return {"ray_actor_options": {"num_cpus": replica["CPU"]},
                "placement_group_bundles": [replica]
                + [worker_bundle(self.worker_num_cpus, self.device)] * world,
                "placement_group_strategy": self.placement_strategy
                or group_strategy(self.device, self.pp)}

    @property
    def replica_cpus(self) -> float:
        """`num_cpus_per_replica`, or its default. Ray gives an actor floor(num_cpus) OpenMP
        threads, so a CPU replica that runs its model itself reserves its share of this
        machine's cores: at 1 CPU it would run on one core of two (measured: 0.52x offline)."""
        if self.num_cpus_per_replica is not None:
            return self.num_cpus_per_replica
        if placement_device(self.device) != "cpu" or self.tp * self.pp > 1:
            return 1.0
        return float(max(1, usable_cores() // self.max_replicas))

    def replica_resources(self) -> Dict[str, float]:
        """What Ray must place for one more replica (the replica and its TP/PP workers)."""
        placement = self.replica_placement()
        actor = placement["ray_actor_options"]
        bundles = placement.get("placement_group_bundles") or [{"CPU": actor["num_cpus"],
                                                                "GPU": actor["num_gpus"]}]
        totals = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
        return {k: v for k, v in totals.items() if k == "CPU" or v}

    @property
    def max_replicas(self) -> int:
        """The most replicas this app runs (the default KV budget is split over them)."""
        return self.autoscaling_config["max_replicas"] if self.autoscaling_config else self.dp

    def replica_count(self) -> Dict[str, Any]:
        if self.autoscaling_config is None:
            return {"num_replicas": self.dp}
        return {"autoscaling_config": {"target_ongoing_requests": 16, **self.autoscaling_config}}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def ingress_options(self) -> Dict[str, Any]:
        """OpenAIIngress keyword arguments: auth, body limit, admission, tool calls."""
        limits = {"max_data_parallel_size": self.max_data_parallel_size,
                  "replica_resources": self.replica_resources(),
                  "scale_timeout_s": self.scale_timeout}
        return {"api_key": self.api_key, "open_paths": self.open_paths,
                "max_body_bytes": self.max_body_bytes,
                "max_ongoing_requests": self.max_ongoing_requests,
                "request_timeout": self.request_timeout, "admin_api_key": self.admin_api_key,
                "scale_limits": limits, "autoscaling": self.autoscaling_config is not None,
                "tool_call_parser": self.tool_call_parser}


def run_app(args: Dict[str, Any], name: str = "raylm", **kwargs):
    """serve.run the app, with Serve's external-scaler API enabled unless Serve autoscales
    (POST /scale_elastic_ep sets the replica count through it). Returns the app handle."""
    from ray import serve

    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    kwargs.setdefault("route_prefix", "/")
    return serve.run(build_app(a), name=name, external_scaler_enabled=a.autoscaling_config is None,
                     **kwargs)


def build_app(args: Dict[str, Any]):
    """Serve application for `args` (a dict of ServeArgs fields)."""
    import ray
    from ray import serve
    from ray.serve.config import DeploymentActorConfig, RequestRouterConfig

    from raylm.dp.coordinator import DPCoordinator
    from raylm.dp.router import DPRouter
    from raylm.serve.ingress import OpenAIIngress
    from raylm.serve.llm_server import COORDINATOR_ACTOR, LLMServer

    a = args if isinstance(args, ServeArgs) else ServeArgs(**args)
    engine = a.engine_config().model_dump()
    llm = serve.deployment(
        LLMServer, name="LLMServer", max_ongoing_requests=a.max_ongoing_requests,
        **a.replica_count(), **a.replica_placement(),
        request_router_config=RequestRouterConfig(request_router_class=DPRouter,
                                                  request_router_kwargs=a.router_kwargs(),
                                                  request_routing_stats_period_s=1.0),
        deployment_actors=[DeploymentActorConfig(name=COORDINATOR_ACTOR,
                                                 actor_class=ray.remote(DPCoordinator),
                                                 actor_options={"num_cpus": 0})],
        health_check_period_s=5, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=a.shutdown_timeout, graceful_shutdown_wait_loop_s=1,
    ).bind(engine, a.model_name, a.engines_per_replica, a.share_cores,
           ROUTING_POLICIES[a.routing_policy].reads_prefixes)
    ingress_cls = serve.ingress()(OpenAIIngress)
    # Serve's own cap sits above the app's admission bound, so requests past the bound reach
    # the ingress and get a fast 429 instead of queueing in the HTTP proxy. On a redeploy the
    # ingress outlives the engines' drain by a margin: requests the engines' deadline cuts off
    # still get their error out through it.
    ingress = serve.deployment(ingress_cls, name="OpenAIIngress", num_replicas=1,
                               max_ongoing_requests=a.max_ongoing_requests + INGRESS_HEADROOM,
                               graceful_shutdown_timeout_s=a.shutdown_timeout
                               + INGRESS_SHUTDOWN_MARGIN_S, graceful_shutdown_wait_loop_s=1,
                               ray_actor_options={"num_cpus": 0,
                                                  "runtime_env": {"env_vars": INGRESS_ENV}})
    return ingress.bind(llm, engine, a.model_name, **a.ingress_options())
