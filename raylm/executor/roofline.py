"""A roofline model of one engine step, for the simulated executor (raylm.executor.sim).

A step's time is the sum of two parts, each bound by compute or by memory, whichever is
slower, plus fixed costs:
  linear layers   2 * params * tokens FLOPs (the LM head only for rows that sample) against
                  reading every weight once;
  attention       4 * heads * head_dim FLOPs per query-key pair against reading each
                  sequence's KV cache (and writing the new tokens' KV);
  overheads       per step (scheduling, sampling, launches) and per decoder layer.
A `ModelShape` comes from an HF config or a named preset; a `DeviceProfile` from a named
preset (datasheet figures times stated efficiencies) or from measuring this machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """What the step time depends on: a dense decoder's sizes and its weights' dtype."""
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * self.hidden * self.intermediate  # gated MLP: gate, up, down

    @property
    def weight_bytes(self) -> int:
        """Weights a step reads: every layer and the LM head (embedding rows are negligible)."""
        return (self.num_layers * self.layer_params + self.vocab * self.hidden) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @classmethod
    def from_hf_config(cls, config, name: str = "", dtype_bytes: int = 2) -> "ModelShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(name or getattr(config, "_name_or_path", "model"), config.num_hidden_layers,
                   config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim,
                   config.intermediate_size, config.vocab_size, dtype_bytes)


@dataclass(frozen=True)
class DeviceProfile:
    """What one accelerator (or this CPU) sustains: bytes/s from memory, FLOP/s at the
    model's dtype, memory for weights and KV, and fixed costs per step and per layer.
    `gemm_curve`, if given, is the GEMM rate measured at several row counts ((rows, FLOP/s),
    rows ascending): a CPU's skinny GEMMs run far below its large-GEMM rate."""
    name: str
    mem_bandwidth: float
    flops: float
    memory_bytes: float
    step_overhead_s: float = 0.0
    layer_overhead_s: float = 0.0
    gemm_curve: Tuple[Tuple[int, float], ...] = ()

    def gemm_flops(self, rows: int) -> float:
        """FLOP/s of the linear layers for a step of `rows` tokens (linear between measured
        points, flat past the ends; `flops` without a curve)."""
        curve = self.gemm_curve
        if not curve:
            return self.flops
        if rows <= curve[0][0]:
            return curve[0][1]
        for (r0, f0), (r1, f1) in zip(curve, curve[1:]):
            if rows <= r1:
                return f0 + (f1 - f0) * (rows - r0) / (r1 - r0)
        return curve[-1][1]


# Datasheet bandwidth x 0.8 and dense bf16 FLOPs x 0.6 (what tuned kernels sustain), CUDA
# graphs (no per-layer launch cost), ~1 ms of scheduling and sampling per step: assumptions,
# stated as such wherever a simulation prints its setup.
DEVICES: Dict[str, DeviceProfile] = {
    "h100": DeviceProfile("H100 SXM 80GB", 3.35e12 * 0.8, 989e12 * 0.6, 80 * GiB, 1e-3),
    "h200": DeviceProfile("H200 141GB", 4.8e12 * 0.8, 989e12 * 0.6, 141 * GiB, 1e-3),
    "a100": DeviceProfile("A100 SXM 80GB", 2.04e12 * 0.8, 312e12 * 0.6, 80 * GiB, 1e-3),
    "l4": DeviceProfile("L4 24GB", 300e9 * 0.8, 121e12 * 0.6, 24 * GiB, 1e-3),
}

MODELS: Dict[str, ModelShape] = {
    "llama-3-8b": ModelShape("Llama-3-8B", 32, 4096, 32, 8, 128, 14336, 128256),
    "llama-3-70b": ModelShape("Llama-3-70B", 80, 8192, 64, 8, 128, 28672, 128256),
    "qwen2.5-7b": ModelShape("Qwen2.5-7B", 28, 3584, 28, 4, 128, 18944, 152064),
    "smollm2-135m": ModelShape("SmolLM2-135M", 30, 576, 9, 3, 64, 1536, 49152),
}

# One scheduled sequence: (tokens already in its KV cache, tokens this step, samples a token?)
SeqStep = Tuple[int, int, bool]


def step_time(model: ModelShape, device: DeviceProfile, seqs: Sequence[SeqStep]) -> float:
    """Seconds one step of `seqs` takes on `device`."""
    tokens = sum(q for _, q, _ in seqs)
    if tokens == 0:
        return 0.0
    samples = sum(1 for _, _, s in seqs if s)
    flops = 2 * (model.num_layers * model.layer_params * tokens + model.vocab * model.hidden
                 * samples)
    linear = max(flops / device.gemm_flops(tokens), model.weight_bytes / device.mem_bandwidth)
    pairs = sum(q * (c + (q + 1) / 2) for c, q, _ in seqs)  # causal: query i sees c + i + 1 keys
    attn_flops = 4 * model.num_layers * model.num_heads * model.head_dim * pairs
    kv_bytes = model.kv_bytes_per_token * sum(c + q for c, q, _ in seqs)
    attention = max(attn_flops / device.flops, kv_bytes / device.mem_bandwidth)
    return linear + attention + device.step_overhead_s + model.num_layers * device.layer_overhead_s


def kv_blocks(model: ModelShape, device: DeviceProfile, block_size: int,
              utilization: float = 0.9) -> int:
    """KV blocks that fit beside the weights in `utilization` of the device's memory."""
    free = device.memory_bytes * utilization - model.weight_bytes
    if free <= 0:
        raise ValueError(f"{model.name} ({model.weight_bytes / GiB:.1f} GiB of weights) does not "
                         f"fit in {device.name} ({device.memory_bytes / GiB:.0f} GiB)")
    return int(free // (model.kv_bytes_per_token * block_size))


def request_seconds(model: ModelShape, device: DeviceProfile, prompt_len: int, output_len: int,
                    batch: int) -> float:
    """Device time one request costs an engine that keeps `batch` sequences decoding: its
    prefill as a step of its own, plus its share (1/batch) of each decode step it is in
    (sequences at this one's mid-decode length). An estimate for sizing loads, not a step."""
    prefill = step_time(model, device, [(0, prompt_len, True)])
    mid = prompt_len + output_len // 2
    decode = step_time(model, device, [(mid, 1, True)] * batch) / batch
    return prefill + max(0, output_len - 1) * decode


def fleet_capacity(model: ModelShape, device: DeviceProfile, lengths: Sequence[Tuple[int, int]],
                   batch: int, engines: int) -> float:
    """Requests/s `engines` engines sustain on requests of these (prompt, output) lengths,
    with no prefix-cache hits: engines over the mean `request_seconds`."""
    mean = sum(request_seconds(model, device, p, o, batch) for p, o in lengths) / len(lengths)
    return engines / mean
