"""Ray's autoscaler adding nodes for the raylm app, on Ray's fake multi-node provider (its
nodes are raylets on this machine). A head with 0 CPUs is started by `RAY_FAKE_CLUSTER=1 ray
start --head --autoscaling-config=...`, with one worker type of 1 CPU (min 1, max 2); the app
asks for one CPU per replica. What happened is printed as JSON on stdout. Run as its own
process by tests/test_multinode.py (`python -m tests.fake_autoscale_scenario ...`).

Scenarios:
  elastic: `dp 1` serves on the first fake node; POST /scale_elastic_ep to 2 makes the
      autoscaler add a node and answers 200 once the new replica serves; to 3 (past the
      autoscaler's maximum, which Ray's v1 autoscaler does not publish) answers 504 at its
      timeout and goes back to 2; completions pinned to each DP rank.
  serve: Serve autoscaling (min 1, max 2 replicas, one ongoing request per replica): long
      requests make Serve ask for a second replica, the autoscaler adds a node for it, and
      requests pinned to the new rank are answered.
Usage: python -m tests.fake_autoscale_scenario elastic|serve MODEL PROMPTS_JSON MAX_TOKENS

Every process of the fake cluster (head, fake nodes, their workers, the agents that rename
themselves `ray::...`) inherits the environment of `ray start`; a tag put there finds and
kills all of them at the end, and nothing else on the machine (`ray stop` would kill every
Ray cluster here, the test suite's own included).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

from tests.multinode_scenario import complete
from tests.waiting import wait_for

RAY = str(Path(sys.executable).with_name("ray"))
TAG = "RAYLM_FAKE_CLUSTER_TAG"
ADMIN_KEY = "fake-cluster-admin"
REPLICA = "ServeReplica:raylm:LLMServer"
DEADLINE_S = 240.0
EMPTY = ("initialization_commands", "setup_commands", "head_setup_commands",
         "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands",
         "cluster_synced_files", "rsync_exclude", "rsync_filter")


def fake_config(gcs_address: str) -> dict:
    """A cluster-launcher config for the fake provider: its nodes join `gcs_address`."""
    provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": gcs_address}
    types = {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
             "cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 1,
                            "max_workers": 2}}
    return {"cluster_name": "fake", "max_workers": 4, "upscaling_speed": 1.0,
            "idle_timeout_minutes": 5, "provider": provider, "auth": {"ssh_user": "ray"},
            "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            "available_node_types": types, "head_node_type": "ray.head.default",
            **{k: [] for k in EMPTY}}


def start_fake_cluster(tag: str, tmp: str) -> str:
    """Start the head (and with it the autoscaler), its files under `tmp`; the GCS address."""
    import ray._private.services as services

    from raylm.distributed.communicator import free_port

    port = free_port("127.0.0.1")
    address = f"{services.get_node_ip_address()}:{port}"
    config = Path(tmp) / "fake.json"
    config.write_text(json.dumps(fake_config(address)))
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", TAG: tag}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={tmp}",
                    f"--autoscaling-config={config}",
                    f"--dashboard-port={free_port('127.0.0.1')}"],
                   env=env, check=True, capture_output=True, timeout=120)
    return address


def tagged(tag: str) -> list:
    """This machine's processes whose environment carries `tag`."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_tagged(tag: str) -> None:
    """SIGKILL the cluster's processes until none is left (a raylet may start a worker while
    its siblings die)."""
    def gone():
        for proc in tagged(tag):
            try:
                proc.send_signal(signal.SIGKILL)
            except Exception:
                pass
        return not tagged(tag)

    wait_for(gone, 60.0, "the fake cluster's processes to exit", interval_s=0.5)


def replica_nodes() -> list:
    """The node IDs of the alive LLMServer replicas (the fake nodes share one IP), from
    Ray's state API (served by the head's dashboard)."""
    import ray
    from ray.util.state import list_actors

    # this cluster's address: a plain lookup refuses when another cluster runs on the host
    # (the test session's own, once an earlier test started it)
    alive = [("class_name", "=", REPLICA), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=alive)
    return sorted(a.node_id for a in actors)


def alive_workers() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def scale(url: str, n: int, timeout_s: float = DEADLINE_S):
    import httpx

    return httpx.post(url + "/scale_elastic_ep",
                      json={"new_data_parallel_size": n, "timeout": timeout_s},
                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=2 * timeout_s + 30)


def per_rank(url: str, prompts, max_tokens: int, ranks) -> dict:
    return {str(r): complete(url, prompts, max_tokens, headers={"X-data-parallel-rank": str(r)})
            for r in ranks}


def elastic_scenario(url: str, app: dict, prompts, max_tokens: int) -> dict:
    from raylm.deployments.openai import run_app

    run_app(app)  # returns once the replica serves (the autoscaler added its node first)
    report = {"workers_before": alive_workers(),
              "texts_before": complete(url, prompts, max_tokens)}
    answer = scale(url, 2)
    report["scaled"] = [answer.status_code, answer.json()]
    report["workers_after"] = alive_workers()
    report["placement"] = replica_nodes()
    report["texts_by_rank"] = per_rank(url, prompts, max_tokens, (0, 1))
    too_big = scale(url, 3, timeout_s=15)
    report["too_big"] = [too_big.status_code, too_big.json()["error"]["message"]]
    report["texts_after_rollback"] = per_rank(url, prompts, max_tokens, (0, 1))
    report["workers_after_rollback"] = alive_workers()
    return report


def serve_scenario(url: str, app: dict, prompts, max_tokens: int) -> dict:
    from raylm.deployments.openai import run_app

    policy = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
              "upscale_delay_s": 0, "downscale_delay_s": 600, "metrics_interval_s": 0.5,
              "look_back_period_s": 1}
    run_app({**app, "autoscaling_config": policy})
    report = {"workers_before": alive_workers()}
    stop = threading.Event()
    load = [threading.Thread(target=_keep_busy, args=(url, prompts[0], stop)) for _ in range(4)]
    for t in load:
        t.start()
    try:
        wait_for(lambda: len(replica_nodes()) == 2 and alive_workers() == 2, DEADLINE_S,
                 "Serve's second replica on a node the autoscaler added", interval_s=1.0)
    finally:
        stop.set()
        for t in load:
            t.join(timeout=120)
    report["workers_after"] = alive_workers()
    report["placement"] = replica_nodes()
    report["texts_by_rank"] = wait_for(lambda: _both_ranks(url, prompts, max_tokens), DEADLINE_S,
                                       "both DP ranks answering")
    return report


def _keep_busy(url: str, prompt, stop: threading.Event) -> None:
    """Long greedy completions, one after another, until `stop` (Serve's load signal)."""
    while not stop.is_set():
        complete(url, [prompt], 100)


def _both_ranks(url: str, prompts, max_tokens: int):
    texts = per_rank(url, prompts, max_tokens, (0, 1))
    return texts if all(t is not None for ts in texts.values() for t in ts) else None


def main(argv) -> None:
    import ray
    from ray import serve

    from raylm.distributed.communicator import free_port

    scenario, model, prompts, max_tokens = argv[1], argv[2], json.loads(argv[3]), int(argv[4])
    tag, tmp = uuid.uuid4().hex, tempfile.mkdtemp(prefix="raylm-fake-")
    app = {"model": model, "dtype": "float32", "dp": 1, "max_model_len": 128, "num_blocks": 64,
           "num_cpus_per_replica": 1, "admin_api_key": ADMIN_KEY}
    try:
        ray.init(address=start_fake_cluster(tag, tmp))
        port = free_port("127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        run = {"elastic": elastic_scenario, "serve": serve_scenario}[scenario]
        report = run(f"http://127.0.0.1:{port}", app, prompts, max_tokens)
        print("REPORT " + json.dumps(report), flush=True)
    finally:
        ray.shutdown()
        kill_tagged(tag)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv)
