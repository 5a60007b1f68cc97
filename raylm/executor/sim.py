"""The simulated executor (`--executor sim`): everything of the engine runs for real (scheduler,
KV manager, engine loop, and above it the coordinator and routers) except the forward pass,
which sleeps for the step's roofline time (raylm.executor.roofline) on a named device and
model shape, and "samples" a fixed cycle of ordinary tokens (from the middle of the
vocabulary, away from special ones). For fleet-scale routing and
scheduling studies on a machine without the accelerators: every figure it produces is a
simulation and says so (`device_info`, step timings, bench output).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Sequence

from raylm.executor.base import Executor
from raylm.executor.roofline import (DEVICES, MODELS, DeviceProfile, ModelShape, kv_blocks,
                                     step_time)
from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

def parse_device(spec: str) -> DeviceProfile:
    """A preset name (h100, h200, a100, l4) or `name:GBps:TFLOPs:GiB[:step_ms[:layer_us]]`
    for a measured device (e.g. this CPU: `cpu:30:0.4:24:2:60`)."""
    if spec in DEVICES:
        return DEVICES[spec]
    parts = spec.split(":")
    try:
        nums = [float(x) for x in parts[1:]]
        if len(parts) < 4 or len(parts) > 6 or min(nums) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"sim_device must be one of {', '.join(DEVICES)} or "
                         f"name:GBps:TFLOPs:GiB[:step_ms[:layer_us]] (got {spec!r})") from None
    nums += [0.0] * (5 - len(nums))
    gbps, tflops, gib, step_ms, layer_us = nums
    return DeviceProfile(parts[0], gbps * 1e9, tflops * 1e12, gib * (1 << 30), step_ms / 1e3,
                         layer_us / 1e6)


def model_shape(name: Any, hf_config, dtype_bytes: int = 2) -> ModelShape:
    """A preset shape by name, else the checkpoint's own (its HF config)."""
    if name is None:
        return ModelShape.from_hf_config(hf_config, dtype_bytes=dtype_bytes)
    if name not in MODELS:
        raise ValueError(f"sim_model must be one of {', '.join(MODELS)} (got {name!r})")
    return MODELS[name]


class SimExecutor(Executor):
    def __init__(self, config, model_path: str) -> None:
        from raylm.models.loader import load_hf_config

        super().__init__(config, model_path)
        p = config.parallel
        if p.world_size > 1:
            raise ValueError("the simulated executor models one device: it needs tp = pp = 1")
        self.device = parse_device(p.sim_device)
        hf_config = load_hf_config(model_path)
        self.model = model_shape(p.sim_model, hf_config)
        self.vocab = hf_config.vocab_size  # of the tokenizer's model: what sampled ids must fit
        self.known: Dict[str, int] = {}  # request -> tokens it has (prompt + sampled)
        self.sampled = 0
        self.simulated_s = 0.0  # the sum of every step's roofline time
        self.deferred = False  # defer_device_time(): the caller waits out each step (due_in)
        self.due_at = 0.0  # perf_counter time the last step's results are due

    def initialize(self) -> int:
        blocks = self.config.cache.num_blocks
        num_blocks = blocks or kv_blocks(self.model, self.device, self.config.cache.block_size)
        logger.info("SIMULATION: %s on %s, %d KV blocks; forward passes are sleeps",
                    self.model.name, self.device.name, num_blocks)
        return num_blocks

    def collective_rpc(self, method: str, args: Sequence[Any] = ()) -> List[Any]:
        answers = {"device_info": (f"simulated {self.device.name}", "sim"), "check_health": True,
                   "kv_bytes_per_block": self.model.kv_bytes_per_token
                   * self.config.cache.block_size}
        return [answers.get(method)]

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        start = time.perf_counter()
        for rid in sched.finished_req_ids:
            self.known.pop(rid, None)
        computed = {r.req_id: r.num_computed_tokens for r in sched.scheduled_new_reqs}
        for r in sched.scheduled_new_reqs:
            self.known[r.req_id] = len(r.prompt_token_ids) + len(r.output_token_ids)
        cached = sched.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        seqs, sampled = [], {}
        for rid, q in sched.num_scheduled_tokens.items():
            samples = computed[rid] + q >= self.known[rid]
            seqs.append((computed[rid], q, samples))
            sampled[rid] = [self._next_token()] if samples else []
            self.known[rid] += int(samples)
        t = step_time(self.model, self.device, seqs)
        self.simulated_s += t
        self.due_at = start + t
        if not self.deferred:
            time.sleep(self.due_in())
        return ModelRunnerOutput(sampled, timings={"forward": t, "simulated": 1.0})

    def defer_device_time(self) -> None:
        self.deferred = True

    def due_in(self) -> float:
        return max(0.0, self.due_at - time.perf_counter())

    def _next_token(self) -> int:
        self.sampled += 1
        quarter = max(1, self.vocab // 4)
        return quarter + self.sampled % quarter  # ids in [vocab/4, vocab/2)
