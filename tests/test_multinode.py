"""The app on a multi-node Ray cluster, simulated on this machine: a head and worker nodes on
loopback addresses (tests/multinode_scenario.py), and nodes that Ray's autoscaler adds on its
fake multi-node provider (tests/fake_autoscale_scenario.py). Each scenario runs as its own
process (a process starts Ray once). Placement is read from Ray's state API; outputs are
compared with the offline engine's greedy tokens on the same weights (fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import random_prompts

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent
MAX_TOKENS = 12


def _run(scenario: str, model: Path, prompts, module: str = "tests.multinode_scenario") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    address_file = Path("/tmp/ray/ray_current_cluster")  # what a plain ray.init() joins
    before = address_file.read_text() if address_file.exists() else None
    try:
        proc = subprocess.run([sys.executable, "-m", module, scenario, str(model),
                               json.dumps(prompts), str(MAX_TOKENS)], capture_output=True,
                              text=True, timeout=600, env=env, cwd=REPO)
    finally:  # a killed scenario must not leave its dead cluster for the next test to join
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("REPORT "):])


def _offline(model: Path, prompts, **kw) -> list:
    from raylm import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", max_model_len=128, num_blocks=64, **kw)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(4, seed=5, lo=3, hi=10)


def test_dp_replicas_spread_over_worker_nodes_and_survive_losing_one(tiny_llama, prompts):
    """`dp 2` on two 2-CPU workers puts one replica on each; killing a worker node's processes
    brings its replica back on the other, and every completion equals the offline engine's."""
    report = _run("dp", tiny_llama, prompts)
    expected = _offline(tiny_llama, prompts)
    assert report["placement"] == ["127.0.0.2", "127.0.0.3"]
    assert report["texts"] == expected
    assert report["after_placement"] == ["127.0.0.3", "127.0.0.3"]
    assert report["after_texts"] == expected


def test_a_pp2_replica_spanning_nodes_gives_the_pp1_tokens(tiny_llama, prompts):
    """`placement_strategy: STRICT_SPREAD` puts the replica and its two stages on three nodes;
    redeployed with the default (PACK), both stages share one worker (each has room for the
    replica and both). Both give the pp 1 engine's greedy tokens."""
    report = _run("pp", tiny_llama, prompts)
    expected = _offline(tiny_llama, prompts)  # pp 1, in this process
    assert len(set(report["placement"])) == 2, report  # the stages' nodes
    assert report["texts"] == expected
    assert len(set(report["packed_placement"])) == 1, report
    assert report["packed_texts"] == expected


def test_elastic_scaling_past_the_cluster_makes_the_autoscaler_add_a_node(tiny_llama, prompts):
    """`dp 1` on the fake cluster's one worker; scaling to 2 brings up a second fake node,
    the answer comes once its replica serves, and both DP ranks give the offline engine's
    tokens. Scaling to 3 (past the autoscaler's max of 2 workers) answers 504 at its timeout
    naming what was missing, and the app goes on serving at 2."""
    report = _run("elastic", tiny_llama, prompts, module="tests.fake_autoscale_scenario")
    expected = _offline(tiny_llama, prompts)
    assert report["workers_before"] == 1 and report["texts_before"] == expected
    assert report["scaled"] == [200, {"message": "scaled to 2 data-parallel replicas",
                                      "new_data_parallel_size": 2}]
    assert report["workers_after"] == 2
    assert len(set(report["placement"])) == 2, report  # one replica on each fake node
    assert report["texts_by_rank"] == {"0": expected, "1": expected}
    assert report["too_big"][0] == 504, report["too_big"]
    assert ("2 of 3 replicas serving" in report["too_big"][1]
            and "back to 2" in report["too_big"][1])
    assert report["texts_after_rollback"] == {"0": expected, "1": expected}
    assert report["workers_after_rollback"] == 2


def test_serve_autoscaling_past_the_cluster_makes_the_autoscaler_add_a_node(tiny_llama, prompts):
    """Serve autoscaling (max 2 replicas, 1 ongoing request each) under 4 clients' long requests
    asks for a replica the one fake worker cannot hold; the autoscaler adds a node, the replica
    lands there and requests pinned to either rank give the offline engine's tokens."""
    report = _run("serve", tiny_llama, prompts, module="tests.fake_autoscale_scenario")
    expected = _offline(tiny_llama, prompts)
    assert report["workers_before"] == 1 and report["workers_after"] == 2
    assert len(set(report["placement"])) == 2, report
    assert report["texts_by_rank"] == {"0": expected, "1": expected}
