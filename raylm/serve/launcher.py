"""`raylm serve`: start (or join) Ray, start Serve's HTTP proxy, run the OpenAI app."""
from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_serve_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP endpoint on Ray Serve")
    add_engine_args(p)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1)
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="let Serve scale the replica set between MIN and MAX on load (instead of --dp)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but --open-paths (default: "
                        "$RAYLM_API_KEY, which keeps the key out of the process list)")
    p.add_argument("--open-paths", nargs="*", default=None, metavar="PATH",
                   help="routes open without the key (default: /health /ping /version; add /metrics to open it)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="engine requests in flight in the app; past it 429 + Retry-After (default 1024)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="requests waiting in each replica's queue; past it 429 + Retry-After (default 256)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="abort a request S seconds after it arrived (408); default: no limit")
    p.add_argument("--shutdown-timeout", type=float, default=None, metavar="S",
                   help="on SIGTERM/SIGINT, let in-flight requests finish for up to S seconds (new ones get "
                        "503); then cut the rest off with an error and stop (default 30)")
    p.add_argument("--admin-api-key", default=None,
                   help="key of the admin routes (/scale_elastic_ep, /is_scaling_elastic_ep), separate from "
                        "--api-key (default: $RAYLM_ADMIN_API_KEY); without one those routes answer 404")
    p.add_argument("--max-data-parallel-size", type=int, default=None, metavar="N",
                   help="the most replicas an elastic scale may ask for (besides what the cluster holds)")
    p.add_argument("--scale-timeout", type=float, default=None, metavar="S",
                   help="an elastic scale not serving at its new size after S seconds is rolled back "
                        "(default 300)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a new local one)")
    p.set_defaults(func=cmd_serve)


def serve_args(args: argparse.Namespace):
    from raylm.cli import engine_kwargs
    from raylm.deployments.openai import ServeArgs

    fields = {**engine_kwargs(args), "model": args.model, "served_model_name": args.served_model_name,
              "dp": args.dp, "num_cpus_per_replica": args.num_cpus_per_replica, "api_key": args.api_key,
              "open_paths": args.open_paths, "max_ongoing_requests": args.max_ongoing_requests,
              "max_waiting_requests": args.max_waiting_requests, "request_timeout": args.request_timeout,
              "shutdown_timeout": args.shutdown_timeout, "admin_api_key": args.admin_api_key,
              "max_data_parallel_size": args.max_data_parallel_size, "scale_timeout": args.scale_timeout}
    fields["tp"], fields["pp"] = fields.pop("tensor_parallel_size"), fields.pop("pipeline_parallel_size")
    if args.autoscale:
        fields["autoscaling_config"] = parse_autoscale(args.autoscale)
    return ServeArgs(**{k: v for k, v in fields.items() if v is not None})


def parse_autoscale(text: str) -> dict:
    """'1:4' -> Serve's autoscaling_config with min_replicas 1, max_replicas 4."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--autoscale must be MIN:MAX replicas, like 1:4 (got {text!r})") from None
    return {"min_replicas": lo, "max_replicas": hi}


def cmd_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from raylm.deployments.openai import run_app

    app_args = serve_args(args)  # validate before starting anything
    ray.init(address=args.address)  # None: Ray joins $RAY_ADDRESS if set, else starts a local cluster
    serve.start(http_options={"host": args.host, "port": args.port})
    handle = run_app(app_args, blocking=False)
    logger.info("serving %s on http://%s:%d/v1 (dp=%d)", app_args.model_name, args.host, args.port, args.dp)
    wait_for_stop_signal()
    drain(handle, app_args.shutdown_timeout)
    serve.shutdown()
    return 0


def drain(handle, timeout_s: float) -> None:
    """Graceful stop: the ingress refuses new requests (503) and gives those in flight up to
    `timeout_s` to finish; the rest end with an error before the replicas stop."""
    logger.info("stopping: draining in-flight requests for up to %.0f s", timeout_s)
    try:
        cut = handle.drain.remote(timeout_s).result(timeout_s=timeout_s + 30)
        logger.info("drained; %d request(s) were cut off at the deadline", cut)
    except Exception as exc:  # the app is going away regardless
        logger.warning("drain did not complete: %r", exc)


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM. Process managers (and shell scripts, whose background
    jobs ignore SIGINT) stop servers with SIGTERM, so both must end `raylm serve` cleanly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
