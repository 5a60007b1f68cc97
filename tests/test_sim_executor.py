"""The simulated executor: its roofline step time against hand-computed values, device and
model parsing, and the real engine running on it (every request gets exactly its tokens,
through chunked prefill and preemption)."""
import pytest

from raylm.executor.roofline import DeviceProfile, ModelShape, kv_blocks, step_time
from raylm.executor.sim import parse_device

# 1 layer, hidden 8, 2 heads x 4 dims (1 KV head), MLP 16, vocab 10, 1-byte weights:
# layer params = 8*4*(2*2 + 2*1) + 3*8*16 = 192 + 384 = 576; weights = 576 + 10*8 = 656 B;
# KV per token = 2 * 1 * 1 * 4 * 1 = 8 B
SHAPE = ModelShape("toy", 1, 8, 2, 1, 4, 16, 10, dtype_bytes=1)
DEVICE = DeviceProfile("toy", mem_bandwidth=1000.0, flops=2000.0, memory_bytes=10_000,
                       step_overhead_s=0.5, layer_overhead_s=0.25)


def test_shape_sizes_by_hand():
    assert (SHAPE.layer_params, SHAPE.weight_bytes, SHAPE.kv_bytes_per_token) == (576, 656, 8)


def test_a_decode_step_is_bound_by_reading_the_weights():
    # one sequence, 9 cached tokens, 1 new, samples: linear FLOPs 2*(576 + 80) = 1312 -> 0.656 s
    # vs 656 B -> 0.656 s (equal by construction); attention pairs 1*(9 + 1) = 10 -> FLOPs
    # 4*1*2*4*10 = 320 -> 0.16 s vs KV 8*(9 + 1) = 80 B -> 0.08 s; + 0.5 + 0.25
    assert step_time(SHAPE, DEVICE, [(9, 1, True)]) == pytest.approx(0.656 + 0.16 + 0.75)


def test_a_prefill_chunk_is_bound_by_compute_and_samples_nothing():
    # 4 new tokens after 2 cached, no sample: linear FLOPs 2*576*4 = 4608 -> 2.304 s (> 0.656);
    # pairs 4*(2 + 2.5) = 18 -> 4*2*4*18 = 576 FLOPs -> 0.288 s vs KV 8*6 = 48 B -> 0.048 s
    assert step_time(SHAPE, DEVICE, [(2, 4, False)]) == pytest.approx(2.304 + 0.288 + 0.75)
    assert step_time(SHAPE, DEVICE, []) == 0.0


def test_kv_blocks_fill_what_the_weights_leave():
    # 0.9 * 10000 - 656 = 8344 B over 8 B/token * 4 tokens/block = 260 blocks
    assert kv_blocks(SHAPE, DEVICE, block_size=4) == 260
    with pytest.raises(ValueError, match="does not fit"):
        kv_blocks(SHAPE, DeviceProfile("tiny", 1, 1, memory_bytes=100), block_size=4)


def test_devices_by_name_or_measured_figures():
    assert parse_device("h100").name.startswith("H100")
    d = parse_device("cpu:30:0.4:24:2:60")
    assert (d.mem_bandwidth, d.flops, d.memory_bytes, d.step_overhead_s,
            d.layer_overhead_s) == pytest.approx(
        (30e9, 0.4e12, 24 * (1 << 30), 2e-3, 60e-6))
    for bad in ("tpu", "cpu:30", "cpu:a:1:1", "cpu:-1:1:1"):
        with pytest.raises(ValueError, match="sim_device must be one of h100"):
            parse_device(bad)


def test_the_engine_on_the_simulator_gives_every_request_its_tokens(tiny_llama):
    """Chunked prefills (prompts past the token budget), a KV pool too small for every
    sequence at once (preemption): each request still ends with exactly max_tokens tokens,
    and the executor slept for the roofline time of what it was given."""
    from raylm import LLM, SamplingParams

    llm = LLM(str(tiny_llama), executor="sim", sim_device="toy:1000:1000:1", max_model_len=256,
              max_num_batched_tokens=48, num_blocks=24, block_size=16)
    prompts = [[5 + i] * (20 + 30 * i) for i in range(6)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [40] * 6
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0
    assert core.executor.device.name == "toy" and core.executor.simulated_s > 0


def test_the_simulator_refuses_what_it_cannot_model(tiny_llama):
    from raylm import LLM

    with pytest.raises(ValueError, match="sim_model must be one of llama-3-8b"):
        LLM(str(tiny_llama), executor="sim", sim_model="gpt-5")


def test_a_measured_gemm_curve_sets_the_linear_layers_rate():
    """Between measured points the rate is interpolated, flat past the ends: at 3 rows of a
    curve (2, 100), (4, 300) it is 200 FLOP/s; a 3-row prefill chunk of SHAPE then takes
    2*576*3 / 200 = 17.28 s of linear time (> 0.656 s of weights)."""
    curve = DeviceProfile("c", 1000.0, 1e9, 10_000, gemm_curve=((2, 100.0), (4, 300.0)))
    assert [curve.gemm_flops(r) for r in (1, 2, 3, 4, 9)] == [100.0, 100.0, 200.0, 300.0, 300.0]
    # attention: pairs 3*(0 + 2) = 6 -> 4*1*2*4*6 = 192 FLOPs at the large-GEMM rate (~0 s)
    # vs KV 8*3 = 24 B -> 0.024 s
    assert step_time(SHAPE, curve, [(0, 3, False)]) == pytest.approx(17.28 + 0.024)


def test_simulated_engines_sharing_an_event_loop_step_concurrently(tiny_llama):
    """A replica may host several simulated engines on one event loop: an engine in a
    simulated step (here one of 60 s) must not hold up another's steps. The second engine's
    request completes while the first's step is still due; a step slept through in the loop
    would hold it for the whole 60 s, past the wait's deadline."""
    import asyncio

    from raylm.config import EngineConfig
    from raylm.engine.async_engine import AsyncEngine
    from raylm.sampling_params import SamplingParams

    def engine(device):
        return AsyncEngine(EngineConfig(model={"model": str(tiny_llama), "max_model_len": 64},
                                        parallel={"executor": "sim", "sim_device": device}))

    async def run():
        slow, fast = engine("slow:1000:1000:1:60000"), engine("toy:1000:1000:1")
        got = {"slow": [], "fast": asyncio.get_running_loop().create_future()}
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        slow.submit({"prompt_token_ids": [5, 6, 7]}, params, "s", got["slow"].append)
        fast.submit({"prompt_token_ids": [5, 6, 7]}, params, "f",
                    lambda out: out.finished and not got["fast"].done()
                    and got["fast"].set_result(out))
        try:
            out = await asyncio.wait_for(got["fast"], 30)
            assert len(out.outputs[0].token_ids) == 4 and got["slow"] == []
            assert slow.engine.core.executor.due_in() > 0  # its first step is still running
        finally:
            slow.shutdown()
            fast.shutdown()

    asyncio.run(run())


def test_a_requests_device_time_and_a_fleets_capacity_by_hand():
    from raylm.executor.roofline import fleet_capacity, request_seconds

    # prefill of 4 (samples 1): FLOPs 2*(576*4 + 80) = 4768 -> 2.384 s; pairs 4*2.5 = 10 -> 320
    # FLOPs -> 0.16 s; + 0.75 = 3.294. Decode at mid length 4 + 1 = 5, batch 2: FLOPs
    # 2*(576*2 + 80*2) = 2624 -> 1.312 s; pairs 2*6 = 12 -> 0.192 s; + 0.75 = 2.254 / 2 per
    # sequence, for 3 - 1 tokens
    assert request_seconds(SHAPE, DEVICE, 4, 3, batch=2) == pytest.approx(3.294 + 2.254)
    assert fleet_capacity(SHAPE, DEVICE, [(4, 3)] * 3, batch=2,
                          engines=10) == pytest.approx(10 / 5.548)


def test_sim_check_streams_a_whole_model_through_the_gemv():
    """The bandwidth sim-check gives the simulator: bytes of every layer's weights and the LM
    head over the GEMV's time (none for fp32 weights, which the GEMV does not serve)."""
    import torch

    from raylm.bench import sim_check
    from raylm.kernels import cpu_ops

    shape = ModelShape("small", 2, 64, 4, 2, 16, 128, 256)
    assert sim_check.stream_bandwidth(shape, torch.float32) is None
    gbps = sim_check.stream_bandwidth(shape, torch.bfloat16)
    if not cpu_ops.gemv_available():
        assert gbps is None
        return
    per_layer = sum(k * n for k, n in sim_check._shapes(shape))
    # qkv, o, gate+up, down
    assert per_layer == 64 * (4 + 2 * 2) * 16 + 64 * 64 + 64 * 2 * 128 + 128 * 64
    assert gbps > 0
