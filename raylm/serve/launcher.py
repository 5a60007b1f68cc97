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
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $RAYLM_API_KEY)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a new local one)")
    p.set_defaults(func=cmd_serve)


def serve_args(args: argparse.Namespace):
    from raylm.cli import engine_kwargs
    from raylm.deployments.openai import ServeArgs

    fields = {**engine_kwargs(args), "model": args.model, "served_model_name": args.served_model_name,
              "dp": args.dp, "num_cpus_per_replica": args.num_cpus_per_replica, "api_key": args.api_key}
    fields["tp"], fields["pp"] = fields.pop("tensor_parallel_size"), fields.pop("pipeline_parallel_size")
    fields.pop("kv_cache_dtype", None)
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
    run_app(app_args, blocking=False)
    logger.info("serving %s on http://%s:%d/v1 (dp=%d)", app_args.model_name, args.host, args.port, args.dp)
    wait_for_stop_signal()
    serve.shutdown()
    return 0


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
