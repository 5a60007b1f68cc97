"""A Ray cluster of simulated nodes on this machine (a head and worker nodes on loopback
addresses), the raylm app on it, and what happened, as JSON on stdout. Run as its own
process by tests/test_multinode.py: a process may start Ray only once.

Scenarios:
  dp: head (0 CPUs: Ray, Serve, the ingress) + workers A, B (2 CPUs each); `--dp 2`; greedy
      completions; then worker A's processes are killed and the app is followed until two
      replicas serve again, and the completions repeat.
  pp: head (1 CPU) and workers A, B (3 CPUs each); one `--pp 2` replica asked to span nodes
      (STRICT_SPREAD: either worker could hold the replica and both stages); greedy
      completions; then redeployed with the default strategy (PACK), completions again.
Usage: python -m tests.multinode_scenario dp|pp MODEL PROMPTS_JSON MAX_TOKENS
"""
from __future__ import annotations

import json
import os
import sys

from tests.waiting import wait_for

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
WORKER_IPS = ["127.0.0.2", "127.0.0.3"]  # Ray rewrites 127.0.0.1 to the eth0 address
DEADLINE_S = 240.0
STARTED = []  # clusters to shut down however the scenario ends


def replicas_by_node(class_name: str) -> dict:
    """Alive actors of `class_name` -> their node's IP, from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    # this cluster's address: a plain lookup refuses when another cluster runs on the host
    # (the test session's own, once an earlier test started it)
    alive = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=alive)
    return {a.actor_id: ips.get(a.node_id, "gone") for a in actors}


def complete(url: str, prompts, max_tokens: int, headers=None) -> list:
    """Greedy completions (None where the request failed)."""
    import httpx

    texts = []
    for prompt in prompts:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
        texts.append(r.json()["choices"][0]["text"] if r.status_code == 200 else None)
    return texts


def start(cpus: list, app: dict):
    from ray import serve
    from ray.cluster_utils import Cluster

    from raylm.deployments.openai import run_app
    from raylm.distributed.communicator import free_port

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": cpus[0], "include_dashboard": True})
    STARTED.append(cluster)
    workers = [cluster.add_node(num_cpus=n, node_ip_address=ip)
               for n, ip in zip(cpus[1:], WORKER_IPS)]
    cluster.connect()
    port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    run_app(app)
    return cluster, workers, f"http://127.0.0.1:{port}"


def dp_scenario(model: str, prompts, max_tokens: int) -> dict:
    app = {"model": model, "dtype": "float32", "dp": 2, "max_model_len": 128, "num_blocks": 64,
           "num_cpus_per_replica": 1}
    cluster, workers, url = start([0, 2, 2], app)
    report = {"placement": sorted(replicas_by_node("ServeReplica:raylm:LLMServer").values())}
    report["texts"] = complete(url, prompts, max_tokens)
    cluster.remove_node(workers[0], allow_graceful=False)  # worker A's raylet and processes die
    wait_for(lambda: sorted(replicas_by_node("ServeReplica:raylm:LLMServer").values())
             == [WORKER_IPS[1]] * 2, DEADLINE_S, "two replicas on the remaining worker",
             interval_s=0.5)
    report["after_placement"] = sorted(replicas_by_node("ServeReplica:raylm:LLMServer").values())
    report["after_texts"] = complete(url, prompts, max_tokens)
    return report


def pp_scenario(model: str, prompts, max_tokens: int) -> dict:
    from raylm.deployments.openai import run_app

    app = {"model": model, "dtype": "float32", "dp": 1, "pp": 2, "max_model_len": 128,
           "num_blocks": 64, "num_cpus_per_replica": 1, "worker_num_cpus": 1,
           "placement_strategy": "STRICT_SPREAD"}
    _, _, url = start([1, 3, 3], app)
    report = {"placement": sorted(replicas_by_node("Worker").values()),
              "texts": complete(url, prompts, max_tokens)}
    run_app({**app, "placement_strategy": None})  # the default (PACK): one node when they fit
    report["packed_placement"] = wait_for(lambda: _packed(replicas_by_node("Worker")), DEADLINE_S,
                                          "the redeployed replica's two stages", interval_s=0.5)
    report["packed_texts"] = complete(url, prompts, max_tokens)
    return report


def _packed(workers: dict):
    """The stages' nodes once only the new replica's two remain (the old ones stop after)."""
    return sorted(workers.values()) if len(workers) == 2 else None


def main(argv) -> None:
    scenario, model, prompts, max_tokens = argv[1], argv[2], json.loads(argv[3]), int(argv[4])
    run = {"dp": dp_scenario, "pp": pp_scenario}[scenario]
    try:
        print("REPORT " + json.dumps(run(model, prompts, max_tokens)), flush=True)
    finally:  # also forgets the cluster's address, which a later ray.init() would otherwise join
        import ray

        ray.shutdown()  # the driver first: a cluster will not remove the node it is connected to
        for cluster in STARTED:
            cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv)
