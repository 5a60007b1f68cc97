"""The app on a multi-node Ray cluster, simulated on this machine: a head and worker nodes on
loopback addresses (tests/multinode_scenario.py, run as its own process: a process starts
Ray once). Placement is read from Ray's state API; outputs are compared with the offline
engine's greedy tokens on the same weights (fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import random_prompts

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
MAX_TOKENS = 12


def _run(scenario: str, model: Path, prompts) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    address_file = Path("/tmp/ray/ray_current_cluster")  # what a plain ray.init() joins
    before = address_file.read_text() if address_file.exists() else None
    try:
        proc = subprocess.run([sys.executable, str(SCENARIO), scenario, str(model), json.dumps(prompts),
                               str(MAX_TOKENS)], capture_output=True, text=True, timeout=600, env=env,
                              cwd=SCENARIO.parent.parent)
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
    """`placement_strategy: STRICT_SPREAD` puts the replica and its two stages on three nodes
    (PACK puts all three on one worker: each has room for them)."""
    report = _run("pp", tiny_llama, prompts)
    assert len(set(report["placement"])) == 2, report  # the stages' nodes
    assert report["texts"] == _offline(tiny_llama, prompts)  # pp 1, in this process
