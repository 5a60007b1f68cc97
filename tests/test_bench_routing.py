"""`raylm bench routing` and `raylm bench sim-capacity`: the router's bookkeeping stays
balanced over the timed loop; the coordinator over real Ray RPCs hands every engine's
reports to a poller; the capacity sizing matches the roofline by hand."""
import asyncio
import random

import pytest

from raylm.bench.routing import fleet_table, time_router
from raylm.dp.policies import ROUTING_POLICIES


@pytest.mark.parametrize("policy", list(ROUTING_POLICIES))
def test_the_timed_router_loop_leaves_no_count_behind(policy):
    rng = random.Random(0)
    prompts = [[rng.randrange(50_000) for _ in range(64)] for _ in range(4)]
    table = fleet_table(8, 16, prompts, rng)
    assert asyncio.run(time_router(policy, table, prompts, 50)) > 0


def test_the_coordinator_over_ray_hands_every_engines_reports_to_a_router(ray_session):
    from raylm.bench.routing_ray import measure

    row = measure(engines=8, per_process=4, seconds=2.0)
    assert (row["processes"], row["engines_seen"]) == (2, 8)
    assert row["cpu_us_per_report"] > 0 and 0 <= row["update_ms_p50"] <= row["update_ms_p99"]


def test_sim_capacity_sizes_a_trace_replay(tmp_path, tiny_llama):
    """Three requests of (100, 10) tokens, 2 s apart over 4 s: the trace's own rate is 3/4
    req/s; the time scale puts it at load x the roofline capacity."""
    from raylm.bench.capacity import add_parser, capacity
    from raylm.executor.roofline import MODELS, fleet_capacity
    from raylm.executor.sim import parse_device

    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:0{2 * i}.0000000,100,10\n" for i in range(3)))
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["sim-capacity", "--engines", "4", "--max-num-seqs", "2", "--load", "0.5",
                              "--tokenizer", str(tiny_llama), "--trace", str(trace), "--num-prompts", "3"])
    out = capacity(args)
    cap = fleet_capacity(MODELS["llama-3-8b"], parse_device("h100"), [(100, 10)] * 3, 2, 4)
    assert out["capacity_req_s"] == pytest.approx(cap)
    assert out["trace_rate_req_s"] == pytest.approx(3 / 4)
    assert out["trace_time_scale"] == pytest.approx(0.5 * cap / 0.75)
