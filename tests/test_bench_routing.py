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


def _capacity_args(tiny_llama, *extra):
    import argparse

    from raylm.bench.capacity import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["sim-capacity", "--tokenizer", str(tiny_llama), "--max-model-len",
                              "256", *extra])


def test_an_engines_capacity_is_its_requests_per_simulated_second(tiny_llama):
    """One request of 100 prompt tokens and 10 outputs: one prefill step (it samples the
    first token), then 9 decode steps at contexts 100..108; nothing else runs."""
    from raylm.bench.capacity import engine_capacity
    from raylm.bench.workload import BenchRequest
    from raylm.executor.roofline import MODELS, step_time
    from raylm.executor.sim import parse_device

    args = _capacity_args(tiny_llama, "--max-num-seqs", "1")
    model, device = MODELS["llama-3-8b"], parse_device("h100")
    seconds = step_time(model, device, [(0, 100, True)]) + sum(
        step_time(model, device, [(c, 1, True)]) for c in range(100, 109))
    request = BenchRequest(list(range(5, 105)), "", 10)
    assert engine_capacity(args, str(tiny_llama), [request]) == pytest.approx(1 / seconds)


def test_sim_capacity_sizes_a_trace_replay(tmp_path, tiny_llama):
    """Three requests 2 s apart over 4 s: the trace's own rate is 3/4 req/s; the time scale
    puts it at load x the measured capacity; the roofline estimate is printed beside it."""
    from raylm.bench.capacity import capacity
    from raylm.executor.roofline import MODELS, fleet_capacity
    from raylm.executor.sim import parse_device

    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
        f"2023-11-16 18:15:0{2 * i}.0000000,100,10\n" for i in range(3)))
    args = _capacity_args(tiny_llama, "--engines", "4", "--max-num-seqs", "2", "--load", "0.5",
                          "--trace", str(trace), "--num-prompts", "3")
    out = capacity(args)
    roofline = fleet_capacity(MODELS["llama-3-8b"], parse_device("h100"), [(100, 10)] * 3, 2, 4)
    assert out["roofline_capacity_req_s"] == pytest.approx(roofline)
    assert out["trace_rate_req_s"] == pytest.approx(3 / 4)
    assert out["trace_time_scale"] == pytest.approx(0.5 * out["capacity_req_s"] / 0.75)
