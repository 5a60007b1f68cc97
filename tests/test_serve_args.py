"""The serving builder's options (ServeArgs) and `raylm serve`'s flags, without starting Ray."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from raylm.deployments.openai import ServeArgs


def test_api_key_defaults_to_the_environment_and_never_shows_in_repr(monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-from-env")
    assert ServeArgs().api_key == "sk-from-env"
    assert ServeArgs(api_key="sk-flag").api_key == "sk-flag"  # the flag wins
    assert "sk-" not in repr(ServeArgs()) and "sk-" not in str(ServeArgs())
    monkeypatch.delenv("RAYLM_API_KEY")
    assert ServeArgs().api_key is None


@pytest.mark.parametrize("fields, word", [
    ({"dp": 2, "pp": 2, "enable_expert_parallel": True}, "pp=1"),
    ({"autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
      "enable_expert_parallel": True}, "elastic"),
    ({"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"engines_per_replica": 2}, "sim executor"),
    ({"engines_per_replica": 2, "executor": "sim", "enable_expert_parallel": True},
     "sim executor"),
])
def test_bad_combinations_are_clear_errors(fields, word):
    with pytest.raises(ValueError, match=word):
        ServeArgs(**fields)


def test_routing_flags_reach_the_router_and_the_replicas():
    from raylm.cli import build_parser
    from raylm.serve.launcher import serve_args

    argv = ["serve", "--routing-policy", "prefix_aware", "--prefix-max-imbalance", "4",
            "--executor", "sim", "--engines-per-replica", "8"]
    a = serve_args(build_parser().parse_args(argv))
    assert a.router_kwargs() == {"policy": "prefix_aware",
                                 "max_imbalance": 4} and a.engines_per_replica == 8
    plain = ServeArgs(routing_policy="round_robin", prefix_max_imbalance=4)
    assert plain.router_kwargs() == {"policy": "round_robin"}


def test_serve_flags_reach_the_admission_auth_and_shutdown_options():
    from raylm.cli import build_parser
    from raylm.serve.launcher import serve_args

    argv = ["serve", "--max-ongoing-requests", "40", "--max-waiting-requests", "8",
            "--request-timeout", "12.5", "--shutdown-timeout", "3", "--open-paths", "/health",
            "/metrics", "--admin-api-key", "sk-adm", "--max-data-parallel-size", "6",
            "--scale-timeout", "45", "--tp", "2", "--num-cpus-per-replica", "0.5",
            "--tool-call-parser", "hermes"]
    a = serve_args(build_parser().parse_args(argv))
    assert (a.max_ongoing_requests, a.max_waiting_requests, a.request_timeout,
            a.shutdown_timeout) == (40, 8, 12.5, 3)
    assert a.engine_config().scheduler.max_waiting_requests == 8
    limits = {"max_data_parallel_size": 6, "replica_resources": {"CPU": 0.5 + 2 * 1.0},
              "scale_timeout_s": 45}
    assert a.ingress_options() == {"api_key": a.api_key, "open_paths": ["/health", "/metrics"],
                                   "max_body_bytes": 1 << 20, "max_ongoing_requests": 40,
                                   "request_timeout": 12.5, "admin_api_key": "sk-adm",
                                   "scale_limits": limits, "autoscaling": False,
                                   "tool_call_parser": "hermes"}
    assert "sk-adm" not in repr(a)
    defaults = serve_args(build_parser().parse_args(["serve"]))
    assert defaults.open_paths == ["/health", "/ping",
                                   "/version"] and defaults.request_timeout is None
    assert defaults.max_data_parallel_size is None and defaults.scale_timeout == 300


def test_kv_cache_dtype_reaches_the_engine_config():
    """`raylm serve --kv-cache-dtype` used to be accepted and silently dropped."""
    from raylm.cli import build_parser
    from raylm.serve.launcher import serve_args

    a = serve_args(build_parser().parse_args(["serve", "--kv-cache-dtype", "float32"]))
    assert a.engine_config().cache.kv_cache_dtype == "float32"
    assert ServeArgs().engine_config().cache.kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServeArgs(kv_cache_dtype="int3").engine_config()


def test_admin_key_defaults_to_its_own_environment_variable(monkeypatch):
    monkeypatch.setenv("RAYLM_API_KEY", "sk-inference")
    monkeypatch.delenv("RAYLM_ADMIN_API_KEY", raising=False)
    assert ServeArgs().admin_api_key is None  # never the inference key
    monkeypatch.setenv("RAYLM_ADMIN_API_KEY", "sk-admin-env")
    assert (ServeArgs().admin_api_key == "sk-admin-env"
            and ServeArgs(admin_api_key="sk-a").admin_api_key == "sk-a")
    assert "sk-admin" not in repr(ServeArgs())


@pytest.mark.parametrize("fields, word", [
    ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
    ({"max_waiting_requests": -1}, "max_waiting_requests"),
    ({"request_timeout": 0}, "request_timeout"), ({"shutdown_timeout": -1}, "shutdown_timeout"),
    ({"max_data_parallel_size": 0}, "max_data_parallel_size"),
    ({"scale_timeout": 0}, "scale_timeout"),
    ({"dp": 3, "max_data_parallel_size": 2}, "max_data_parallel_size"),
])
def test_bad_limits_are_clear_errors(fields, word):
    with pytest.raises(ValueError, match=word):
        ServeArgs(**fields)


def test_cuda_replicas_ask_ray_for_one_gpu_per_worker():
    """device='cuda': a TP=1 replica holds one GPU; a TP/PP replica's workers one each, a
    TP-only group packed onto one node. CPU replicas ask for none."""
    alone = ServeArgs(device="cuda").replica_placement()
    assert alone["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    tp = ServeArgs(device="cuda", tp=2, num_cpus_per_replica=0.5).replica_placement()
    assert tp["placement_group_bundles"] == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 1},
                                             {"CPU": 1.0, "GPU": 1}]
    assert (tp["placement_group_strategy"] == "STRICT_PACK"
            and "num_gpus" not in tp["ray_actor_options"])
    assert (ServeArgs(device="cuda", tp=2, pp=2).replica_placement()["placement_group_strategy"]
            == "PACK")
    assert ServeArgs(device="cuda", tp=2).replica_resources() == {"CPU": 3.0, "GPU": 2}
    cpu = ServeArgs(device="cpu", tp=2)
    assert all("GPU" not in b for b in cpu.replica_placement()["placement_group_bundles"])
    assert cpu.replica_resources() == {"CPU": 3.0}
    assert ServeArgs(device="cpu").replica_placement()["ray_actor_options"]["num_gpus"] == 0


@pytest.mark.parametrize("cores, dp, want", [(2, 1, 2.0), (2, 2, 1.0), (2, 3, 1.0), (16, 3, 5.0)])
def test_a_cpu_replica_reserves_its_share_of_the_cores_by_default(monkeypatch, cores, dp, want):
    """Ray gives an actor floor(num_cpus) OpenMP threads: a CPU replica that runs its model
    reserves cores // dp (at least 1); TP/PP replicas and CUDA keep 1; an explicit value wins."""
    from raylm.deployments import openai as builder

    monkeypatch.setattr(builder, "usable_cores", lambda: cores)
    args = ServeArgs(device="cpu", dp=dp)
    assert args.replica_placement()["ray_actor_options"]["num_cpus"] == want
    assert args.replica_resources() == {"CPU": want * 1}
    assert ServeArgs(device="cpu", autoscaling_config={"max_replicas": dp}).replica_cpus == want
    assert ServeArgs(device="cpu", dp=dp, tp=2).replica_cpus == 1.0
    assert ServeArgs(device="cuda", dp=dp).replica_cpus == 1.0
    assert ServeArgs(device="cpu", dp=dp, num_cpus_per_replica=0.5).replica_cpus == 0.5


@pytest.mark.parametrize("argv, joining, proxy_port, direct", [
    ([], False, 0, True), (["--proxy"], False, 8123, False), ([], True, 8123, False)])
def test_direct_ingress_by_default_on_a_cluster_serve_starts(monkeypatch, argv, joining,
                                                             proxy_port, direct):
    """`raylm serve` serves --port from the ingress replica (Ray's direct ingress settings, read
    by the Ray processes it starts); --proxy, or joining a running cluster, keeps Serve's proxy."""
    import os

    from raylm.cli import build_parser
    from raylm.serve.launcher import http_options

    monkeypatch.setattr(os, "environ", {"RAY_ADDRESS": "10.0.0.1:6379"} if joining else {})
    options = http_options(build_parser().parse_args(["serve", "--port", "8123", *argv]))
    assert options == {"host": "127.0.0.1", "port": proxy_port}
    assert (os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1") == direct
    if direct:
        assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8123"
        assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"
    # only a cluster this command starts gets the slower Serve control loop
    assert (os.environ.get("RAY_SERVE_CONTROL_LOOP_INTERVAL_S") == "0.5") == (not joining)
    assert ("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD" in os.environ) == (not joining)


@pytest.mark.parametrize("local_env", [False, True])
def test_log_monitor_rescans_every_half_second_under_local_serve_env(local_env):
    """Ray's log monitor (its own code, in a fresh interpreter) globs the log folder on every
    0.1 s pass under its defaults, and at most every LOG_NAME_UPDATE_INTERVAL_S with the
    settings `raylm serve` gives a cluster it starts: the name and meaning Ray still honours."""
    import os
    import subprocess
    import sys

    from raylm.serve.launcher import local_serve_env

    probe = ("import time, types; from ray._private.log_monitor import LogMonitor; "
             "print(LogMonitor.should_update_filenames("
             "types.SimpleNamespace(log_filenames=set()), time.time()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_LOG_MONITOR")}
    env.update(local_serve_env() if local_env else {})
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[-1] == ("False" if local_env else "True")


def test_placement_options_place_tp_pp_groups_and_spread_single_replicas():
    grouped = ServeArgs(pp=2, placement_strategy="STRICT_SPREAD").replica_placement()
    assert (grouped["placement_group_strategy"] == "STRICT_SPREAD"
            and len(grouped["placement_group_bundles"]) == 3)
    assert ServeArgs(pp=2).replica_placement()["placement_group_strategy"] == "PACK"  # the default
    alone = ServeArgs(dp=4, max_replicas_per_node=1).replica_placement()
    assert alone["max_replicas_per_node"] == 1 and "placement_group_bundles" not in alone
    assert "max_replicas_per_node" not in ServeArgs(dp=4).replica_placement()
    with pytest.raises(ValueError, match="needs tp or pp"):
        ServeArgs(placement_strategy="SPREAD")
    with pytest.raises(ValueError, match="without TP/PP"):
        ServeArgs(tp=2, max_replicas_per_node=1)
    with pytest.raises(ValueError, match="placement_strategy"):
        ServeArgs(pp=2, placement_strategy="EVERYWHERE")


def test_the_cli_waits_out_time_wait_on_its_port_and_refuses_a_taken_one():
    """Serve's ingress replica binds --port without SO_REUSEADDR, so a port a stopped server
    closed connections on (TIME_WAIT) fails that bind for a minute; the CLI waits for it, and
    a port another server listens on is an error naming it."""
    import socket

    from raylm.serve.launcher import wait_port_bindable

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    with pytest.raises(ValueError, match=f"another server listens on 127.0.0.1:{port}"):
        wait_port_bindable("127.0.0.1", port)
    server.accept()[0].close()  # the check's own connection
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its end of the connection is in TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    with pytest.raises(ValueError, match=f"--port {port}: still in use on 127.0.0.1 after 0 s"):
        wait_port_bindable("127.0.0.1", port, timeout_s=0.0)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    wait_port_bindable("127.0.0.1", free_port)  # returns at once


GiB = 1 << 30


@pytest.mark.parametrize("weights, cores, available, want", [
    (270 << 20, 2, 22 * GiB, 2),   # SmolLM2 on this machine: one per core
    (270 << 20, 64, 22 * GiB, 8),  # capped at AUTO_DP_MAX
    (14 * GiB, 2, 22 * GiB, 1),    # a 7B bf16 model: 29 GiB a replica, never below 1
    (2 * GiB, 4, 22 * GiB, 2),     # 13.2 GiB // (4 + 1) GiB
    (None, 2, 22 * GiB, 1),        # a checkpoint of unknown size
])
def test_auto_dp_is_one_replica_per_core_while_they_fit(weights, cores, available, want):
    from raylm.deployments.openai import auto_dp

    assert auto_dp(weights, cores, available) == want


def test_dp_auto_resolves_on_the_building_machine_and_only_for_plain_cpu_replicas(monkeypatch,
                                                                                  tmp_path):
    """The default (and `dp=auto`, `--dp auto`) becomes a number when the app is built: the
    checkpoint's file sizes and this machine's cores and memory; CUDA, TP/PP, EP, the sim
    executor and Serve autoscaling keep 1; max_data_parallel_size bounds it; a number wins."""
    from raylm.cli import build_parser
    from raylm.deployments import openai as builder
    from raylm.serve.launcher import serve_args

    ckpt = tmp_path / "m"
    ckpt.mkdir()
    with open(ckpt / "model.safetensors", "wb") as f:
        f.truncate(300 << 20)  # sparse: only its size is read
    monkeypatch.setattr(builder, "usable_cores", lambda: 4)
    monkeypatch.setattr(builder.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=20 * GiB))
    cpu = {"model": str(ckpt), "device": "cpu"}
    assert ServeArgs(**cpu).dp == 4 and ServeArgs(**cpu, dp="auto").dp == 4
    assert serve_args(build_parser().parse_args(["serve", "--model", str(ckpt), "--device",
                                                 "cpu"])).dp == 4
    assert serve_args(build_parser().parse_args(["serve", "--model", str(ckpt), "--dp",
                                                 "3"])).dp == 3
    assert ServeArgs(**cpu, max_data_parallel_size=2).dp == 2
    for other in ({"device": "cuda"}, {"tp": 2}, {"pp": 2}, {"enable_expert_parallel": True},
                  {"executor": "sim"}, {"autoscaling_config": {"max_replicas": 2}}):
        assert ServeArgs(**{**cpu, **other}).dp == 1, other
    assert ServeArgs(**cpu).replica_cpus == 1.0  # each of the 4 reserves its core
    monkeypatch.setattr(builder.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=3 * GiB))
    assert ServeArgs(**cpu).dp == 1  # 1.8 GiB holds one replica of 1.6 GiB
    with pytest.raises(ValueError, match="dp"):
        ServeArgs(dp="many")


@pytest.mark.parametrize("argv, joining, expected", [
    ([], False, {"address": None}),
    (["--no-include-dashboard"], False, {"address": None, "include_dashboard": False}),
    (["--include-dashboard"], False, {"address": None, "include_dashboard": True}),
    ([], True, {"address": None}),
])
def test_ray_init_kwargs_set_the_dashboard_only_when_asked(monkeypatch, argv, joining, expected):
    """Ray's default (the dashboard on) unless the command line says otherwise; ray.init refuses
    include_dashboard when it joins a cluster, so that gets a clear error first."""
    import os

    from raylm.cli import build_parser
    from raylm.serve.launcher import ray_init_kwargs

    monkeypatch.setattr(os, "environ", {"RAY_ADDRESS": "10.0.0.1:6379"} if joining else {})
    assert ray_init_kwargs(build_parser().parse_args(["serve", *argv])) == expected
    if joining:
        with pytest.raises(ValueError, match="--include-dashboard applies to a cluster"):
            ray_init_kwargs(build_parser().parse_args(["serve", "--no-include-dashboard"]))
