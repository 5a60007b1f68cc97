"""Owns the model and its KV cache on one device: prepare inputs, forward, sample."""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import psutil
import torch

from raylm.attention import AttentionMetadata, KVCachePool, PrefillSeq, create_attention_backend
from raylm.config import EngineConfig, parse_memory
from raylm.executor.sampler import Sampler, SamplingInput, position_logprobs
from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.executor.cuda_graphs import DecodeGraphs, capture_sizes
from raylm.executor.input_batch import InputBatch, StepInputs
from raylm.models.attention import PagedAttention
from raylm.models.fused_decode import build_fused_decode
from raylm.models.layers import prepack_linears
from raylm.models.loader import checkpoint_dtype, load_hf_config, load_model
from raylm.distributed.parallel_state import CommClock, get_ep_group, get_pp_group, get_tp_group
from raylm.kernels import machine, ops
from raylm.outputs import PositionLogprobs
from raylm.structured import apply_bitmask

logger = logging.getLogger(__name__)
PROMPT_LOGITS_ROWS = 256


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.hf_config = load_hf_config(model_path)
        self.device = config.model.torch_device()
        self.dtypes = machine.choose_dtypes(config.model.dtype, self.device,
                                            checkpoint_dtype(self.hf_config),
                                            config.model.cpu_gemm_dtype)
        logger.info("dtype=%s: %s", config.model.dtype, self.dtypes.reason)
        self.dtype = self.dtypes.weights
        self.kv_dtype = config.cache.torch_kv_dtype(self.dtype)
        self.block_size = config.cache.block_size
        self.backend = create_attention_backend(config.model.attention_backend, self.device,
                                                self.kv_dtype)
        ops.check_mode(config.model.fused_ops, self.device)
        self.fused_ops = ops.resolve(config.model.fused_ops, self.device)
        self.batch = InputBatch(self.block_size, self.backend)
        self.sampler = Sampler()
        self.model = None
        self.kv_pool: Optional[KVCachePool] = None
        self.graphs: Optional[DecodeGraphs] = None  # CUDA decode graphs (capture_graphs)
        # seconds per phase of the latest step (bench step)
        self.last_step_times: Dict[str, float] = {}

    def load_model(self) -> None:
        self.model = load_model(self.model_path, self.hf_config, self.dtype, self.device)
        if self.device.type == "cpu" and self.config.model.cpu_linear == "onednn":
            prepack_linears(self.model, gemm_dtype=self.dtypes.gemm)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]

    def kv_bytes_per_block(self) -> int:
        a = self.attn_layers[0]
        return KVCachePool.bytes_per_block(self.backend, len(self.attn_layers), self.block_size,
                                           a.num_kv_heads, a.head_dim, self.kv_dtype)

    def determine_num_blocks(self) -> int:
        """Blocks that fit the budget: `num_blocks` if set, else `kv_cache_memory` (bytes, or a
        fraction of currently available memory). The default, 0.3 of available memory capped
        at 4 GiB, is split over the DP replicas: on one node they share that memory, and each
        replica touches its whole budget under sustained load (prefix-cache LRU), so dp
        full budgets would add up to dp x 4 GiB. On a multi-node cluster, set it explicitly."""
        cache = self.config.cache
        if cache.num_blocks:
            return cache.num_blocks
        if self.device.type == "cuda":
            return max(1, self._cuda_kv_budget() // self.kv_bytes_per_block())
        budget = parse_memory(cache.kv_cache_memory) if cache.kv_cache_memory is not None else None
        available = psutil.virtual_memory().available
        if budget is None:
            budget = min(int(0.3 * available), 4 << 30) // self.config.parallel.data_parallel_size
        elif isinstance(budget, float):
            budget = int(budget * available)
        return max(1, budget // self.kv_bytes_per_block())

    def _cuda_kv_budget(self) -> int:
        """vLLM's rule: gpu_memory_utilization of the GPU's memory, less what this process
        peaks at in a forward of max_num_batched_tokens (weights, activations) and what other
        processes hold. Profiled with a zero-block cache (a fresh prefill reads none) and, with
        EP across DP replicas, local experts only: the other replicas are not profiling in
        step with this one, so the group's collectives must not run."""
        self.init_kv_cache(0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        tokens = min(self.config.scheduler.max_num_batched_tokens,
                     self.hf_config.max_position_embeddings)
        ep = get_ep_group()
        group, ep.dp = ep.dp, None
        try:
            with torch.inference_mode():
                self._forward(dummy_step(self.device, tokens))
        finally:
            ep.dp = group
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak - others
        if budget <= 0:
            raise ValueError(f"no GPU memory left for the KV cache: gpu_memory_utilization="
                             f"{self.config.cache.gpu_memory_utilization} of {total >> 20} MiB, "
                             f"this process peaks at {peak >> 20} MiB, other processes hold "
                             f"{others >> 20} MiB")
        return budget

    def init_kv_cache(self, num_blocks: int) -> None:
        a = self.attn_layers[0]
        self.kv_pool = KVCachePool(self.backend, len(self.attn_layers), num_blocks,
                                   self.block_size, a.num_kv_heads, a.head_dim, self.kv_dtype)
        for i, layer in enumerate(self.attn_layers):
            layer.bind(self.kv_pool, i)
        if (self.device.type == "cpu" and self.fused_ops == "cpu"
                and hasattr(self.model, "fused_decode")):
            self.model.fused_decode = build_fused_decode(self.model, get_tp_group().size)

    def graphs_supported(self) -> bool:
        """Decode graphs need the Triton attention and fused ops (no host syncs in the step) and
        one process per replica: no TP/PP collectives, no lockstep with other DP replicas."""
        return (self.backend.name == "triton" and self.fused_ops == "triton"
                and self.config.parallel.world_size == 1 and get_ep_group().dp is None)

    @torch.inference_mode()
    def capture_graphs(self, capture: Optional[bool] = None) -> int:
        """Set up decode graphs at bucketed batch sizes; returns how many were captured. By
        default they are captured on CUDA unless enforce_eager; `capture=False` keeps the
        padded-bucket path but runs it eagerly (how the tests exercise it on CPU)."""
        if capture is None:
            if self.device.type != "cuda" or self.config.model.enforce_eager:
                return 0
            capture = True
        if not self.graphs_supported() or (capture and self.device.type != "cuda"):
            return 0
        max_len = self.config.model.max_model_len or self.hf_config.max_position_embeddings
        self.graphs = DecodeGraphs(self.device, capture_sizes(self.config.scheduler.max_num_seqs),
                                   -(-max_len // self.block_size))
        if capture:
            with ops.using(self.fused_ops):
                self.graphs.capture(self.model)
        return len(self.graphs.graphs)

    @torch.inference_mode()
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        clock = _PhaseClock()
        CommClock.take()  # count this step's transfers only
        self.batch.update(sched)
        ep = get_ep_group()
        if ep.dp is not None:  # lockstep with the other DP replicas (expert parallelism over DP)
            busy = ep.begin_step(max(1, sched.total_num_scheduled_tokens), sched.dp_unfinished)
            if busy == 0 or sched.is_empty:
                if busy:
                    # join every collective of the busy ranks' step
                    self._forward(dummy_step(self.device))
                return ModelRunnerOutput({},
                                         timings={"dummy": clock.since_start(),
                                                  "comm": CommClock.take()}, dp_unfinished=busy)
        elif sched.is_empty:
            return ModelRunnerOutput({})
        step = self.batch.prepare(sched)
        clock.mark("prepare")
        hidden = self._forward(step)
        clock.mark("forward")
        if hidden is None:
            return ModelRunnerOutput({})  # an earlier pipeline stage: its output went to the next
        sampled = {req_id: [] for req_id in step.req_ids}
        logprobs = {}
        prompt_logprobs = self._prompt_logprobs(hidden, step) if step.prompt_rows else {}
        if step.sample_req_ids:
            # a TP collective: every rank
            logits = self.model.compute_logits(hidden[step.logits_rows])
            clock.mark("logits")
            if get_tp_group().rank != 0:
                return ModelRunnerOutput({})  # only TP rank 0 of the last stage samples
            if sched.grammar_req_ids:  # structured outputs: disallowed tokens to -inf
                rows = {r: i for i, r in enumerate(step.sample_req_ids)}
                apply_bitmask(logits, sched.grammar_bitmask,
                              [rows[r] for r in sched.grammar_req_ids])
                clock.mark("grammar")
            result = self.sampler(logits, [self._sampling_input(r) for r in step.sample_req_ids])
            for req_id, token, lp in zip(step.sample_req_ids, result.token_ids, result.logprobs):
                sampled[req_id] = [token]
                if lp is not None:
                    logprobs[req_id] = [lp]
            clock.mark("sample")
        self.last_step_times = {**clock.times, "comm": CommClock.take()}
        return ModelRunnerOutput(sampled, logprobs, self.last_step_times,
                                 busy if ep.dp is not None else None, prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, step) -> Dict[str, List[PositionLogprobs]]:
        """Logprobs of the prompt tokens that this step's rows predict, for the requests that
        asked, from the same forward; logits in slices of PROMPT_LOGITS_ROWS rows (a 2k-token
        prompt's full logits would be 2k x vocab fp32)."""
        out: Dict[str, List[PositionLogprobs]] = {}
        for req_id, first, targets in step.prompt_rows:
            top = self.batch.requests[req_id].sampling_params.prompt_logprobs
            out[req_id] = []
            for j in range(0, len(targets), PROMPT_LOGITS_ROWS):
                part = targets[j:j + PROMPT_LOGITS_ROWS]
                # TP collective
                logits = self.model.compute_logits(hidden[first + j:first + j + len(part)])
                out[req_id] += (position_logprobs(logits, part, top) if get_tp_group().rank == 0
                                else [])
        return out if get_tp_group().rank == 0 else {}

    def _forward(self, step) -> Optional[torch.Tensor]:
        """The model's forward for this stage: receive (hidden, residual) from the previous
        stage, run our layers, and send them on (returns None) or return the final hidden."""
        if self.graphs is not None and self.graphs.can_run(step):
            with ops.using(self.fused_ops):
                return self.graphs.run(step, self.model)
        pp = get_pp_group()
        intermediate = None
        if not pp.is_first:
            shape = (step.input_ids.shape[0], self.hf_config.hidden_size)
            intermediate = tuple(pp.recv_prev(shape, self.dtype, 2))
        with ops.using(self.fused_ops):
            out = self.model(step.input_ids, step.positions, step.meta, intermediate)
        if pp.is_last:
            return out
        pp.send_next(out)
        return None

    def _sampling_input(self, req_id: str) -> SamplingInput:
        state = self.batch.requests[req_id]
        return SamplingInput(state.sampling_params, state.prompt_token_ids, state.output_token_ids)


def dummy_step(device: torch.device, num_tokens: int = 1) -> StepInputs:
    """A forward that writes no KV (it owns no cache slot): one fresh causal prefill of
    `num_tokens` at positions 0.. . With one token it is the lockstep dummy step (it makes
    every collective call a real step makes); with many, the KV-budget profiling forward."""
    ids = torch.arange(num_tokens, device=device) % 2  # any valid token ids
    meta = AttentionMetadata(torch.zeros(num_tokens, dtype=torch.long, device=device),
                             prefills=[PrefillSeq(0, num_tokens, num_tokens, None)],
                             store_kv=False)
    return StepInputs(ids, torch.arange(num_tokens, device=device), meta, [],
                      torch.zeros(0, dtype=torch.long), [])


class _PhaseClock:
    """Seconds spent in each named phase since the previous mark."""

    def __init__(self) -> None:
        self.times: Dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def since_start(self) -> float:
        return time.perf_counter() - self._start

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = now - self._last
        self._last = now
