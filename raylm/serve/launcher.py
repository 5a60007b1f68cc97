"""`raylm serve`: start (or join) Ray, start Serve, run the OpenAI app.

By default the app's ingress replica serves HTTP itself on --port (Ray Serve's direct ingress),
instead of behind Serve's HTTP proxy: every streamed chunk through the proxy is a Ray object
from the ingress to the proxy, which cost ~2 ms of CPU per token on the cores the engine needs.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import socket
import time

from raylm.config import ray_address

logger = logging.getLogger(__name__)

# Direct ingress: the ingress replica takes the first free port of [--port, --port + span].
DIRECT_INGRESS_PORT_SPAN = 15
CONTROL_LOOP_INTERVAL_S = 0.5  # Serve's default is 0.1 (see local_serve_env)
PORT_WAIT_S = 70.0  # Linux holds a port a server closed connections on in TIME_WAIT for 60 s


# ServeArgs fields the command line sets another way (--autoscale MIN:MAX)
_NOT_FLAGS = {"autoscaling_config"}


def add_serve_parser(sub, add_engine_args) -> None:
    """`raylm serve`: a flag per ServeArgs field (engine options, then serving ones: one
    declaration each, in raylm.config and ServeArgs), plus where to listen and what to join."""
    from raylm.deployments.openai import ServeArgs
    from raylm.options import add_field_args, engine_options

    p = sub.add_parser("serve",
                       help="serve a model behind an OpenAI-compatible HTTP endpoint on Ray Serve")
    add_engine_args(p)
    serving = {n: f for n, f in ServeArgs.model_fields.items() if n not in engine_options()
               and n not in _NOT_FLAGS}
    add_field_args(p, serving, "serving options")
    p.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="let Serve scale the replica set between MIN and MAX on load (instead of "
                        "--dp)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local one)")
    p.add_argument("--include-dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="run Ray's dashboard on a cluster this command starts (default: on; off "
                        "frees ~1%% of a 2-core machine, and the dashboard UI and Serve's REST "
                        "API with it: docs/benchmarks.md, session 19)")
    p.add_argument("--proxy", action="store_true",
                   help="serve HTTP through Serve's proxy actor on --port instead of from the "
                        "ingress replica itself (direct ingress, the default on a cluster this "
                        "command starts)")
    p.set_defaults(func=cmd_serve)


def serve_args(args: argparse.Namespace):
    """The ServeArgs a `raylm serve` command line describes (unset flags: ServeArgs' defaults)."""
    from raylm.deployments.openai import ServeArgs

    fields = {n: getattr(args, n) for n in ServeArgs.model_fields
              if getattr(args, n, None) is not None}
    if args.autoscale:
        fields["autoscaling_config"] = parse_autoscale(args.autoscale)
    return ServeArgs(**fields)


def parse_autoscale(text: str) -> dict:
    """'1:4' -> Serve's autoscaling_config with min_replicas 1, max_replicas 4."""
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError("--autoscale must be MIN:MAX replicas, like 1:4 (got "
                         f"{text!r})") from None
    return {"min_replicas": lo, "max_replicas": hi}


def direct_ingress_env(port: int) -> dict:
    """Ray Serve settings (read by Ray's processes at start) for direct ingress on `port`.

    No load balancer sits in front to deregister a replica from, so a stopping ingress does not
    wait out Ray's 30 s deregistration window, and a replaced one gets `port` back at once."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + DIRECT_INGRESS_PORT_SPAN),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def local_serve_env() -> dict:
    """Ray and Serve settings for a cluster this command starts (issue 17; README "Decisions").
    On a small machine the control plane shares the engine's cores:
    - Serve's controller reconciles every 0.5 s instead of 0.1 s (each wake-up stalled the
      engine's OpenMP threads: ~4% of a core idle); replicas still start, stop and get
      health-checked within a tick.
    - Ray's log monitor looks for new log files every 0.5 s instead of globbing the log folder
      10 times a second (under ~1000 files it ignores its own interval); lines of files it
      follows still stream every 0.1 s.
    (Serve's throughput-optimized mode was measured and left off: docs/benchmarks.md.)"""
    return {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(CONTROL_LOOP_INTERVAL_S),
            "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0"}


def http_options(args: argparse.Namespace) -> dict:
    """Serve's http_options, and with direct ingress Ray's settings for it (env vars that the
    Ray processes this command starts inherit). Serve's own head-node proxy then moves off
    --port to a free port: it stays a slower way in. A cluster that `raylm serve` joins keeps
    the settings it was started with, so there the proxy serves --port."""
    joining = _joining(args)
    if not joining:
        os.environ.update(local_serve_env())
    if args.proxy or joining:
        if joining and not args.proxy:
            logger.info("joining a running Ray cluster: HTTP goes through Serve's proxy "
                        "(start the cluster with direct ingress for the faster path; README)")
        return {"host": args.host, "port": args.port}
    os.environ.update(direct_ingress_env(args.port))
    return {"host": args.host, "port": 0}


def _joining(args: argparse.Namespace) -> bool:
    """Whether `raylm serve` joins a running Ray cluster rather than starting one."""
    return bool(args.address or ray_address())


def ray_init_kwargs(args: argparse.Namespace) -> dict:
    """ray.init's arguments: the cluster to join (None: $RAY_ADDRESS, else a new local one),
    and for a new one whether it runs the dashboard."""
    if args.include_dashboard is None:
        return {"address": args.address}
    if _joining(args):
        raise ValueError("--include-dashboard applies to a cluster `raylm serve` starts; a "
                         "running cluster keeps its own (`ray start --include-dashboard ...`)")
    return {"address": args.address, "include_dashboard": args.include_dashboard}


def wait_port_bindable(host: str, port: int, timeout_s: float = PORT_WAIT_S) -> None:
    """Wait until `port` binds the way Serve's ingress replica binds it (without SO_REUSEADDR).
    Connections a previous server on it closed stay in TIME_WAIT for a minute, and meanwhile
    the replica would quietly take the next port of its range while we announce this one.
    A port something listens on, or one still taken after `timeout_s`, is a ValueError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        if _listening(family, host, port):
            raise ValueError(f"--port {port}: another server listens on {host}:{port}")
        if time.monotonic() > deadline:
            raise ValueError(f"--port {port}: still in use on {host} after {timeout_s:.0f} s")
        if not said:
            logger.info("port %d: waiting for a previous server's closed connections to expire "
                        "(TIME_WAIT, up to a minute)", port)
            said = True
        time.sleep(0.5)


def _listening(family: int, host: str, port: int) -> bool:
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        return sock.connect_ex((target, port)) == 0


def cmd_serve(args: argparse.Namespace) -> int:
    options = http_options(args)  # before Ray (and Serve's settings) are imported
    if options["port"] == 0:  # direct ingress: the ingress replica binds --port itself
        wait_port_bindable(args.host, args.port)
    import ray
    from ray import serve

    from raylm.deployments.openai import run_app

    app_args = serve_args(args)  # validate before starting anything
    ray.init(**ray_init_kwargs(args))
    serve.start(http_options=options)
    handle = run_app(app_args, blocking=False)
    logger.info("serving %s on http://%s:%d/v1 (dp=%d)", app_args.model_name, args.host, args.port,
                app_args.dp)
    wait_for_stop_signal()
    asyncio.run(stop(handle, app_args.shutdown_timeout))
    return 0


async def stop(handle, timeout_s: float) -> None:
    """Drain, then shut Serve down, on one event loop (in Serve's throughput-optimized mode,
    should a cluster run with it, a handle's router runs on its caller's loop: a synchronous
    call from here would never be sent)."""
    from ray import serve

    await drain(handle, timeout_s)
    await serve.shutdown_async()


async def drain(handle, timeout_s: float) -> None:
    """Graceful stop: the ingress refuses new requests (503) and gives those in flight up to
    `timeout_s` to finish; the rest end with an error before the replicas stop."""
    logger.info("stopping: draining in-flight requests for up to %.0f s", timeout_s)
    try:
        cut = await asyncio.wait_for(handle.drain.remote(timeout_s), timeout_s + 30)
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
