"""Owns the model and its KV cache on one device: prepare inputs, forward, sample."""
from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import psutil
import torch

from raylm.config import EngineConfig, parse_memory
from raylm.engine.sampler import Sampler, SamplingInput
from raylm.kernels import cpu_paged_attention
from raylm.engine.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.executor.input_batch import InputBatch, StepInputs
from raylm.models.attention import AttentionMetadata, PagedAttention, PrefillSeq
from raylm.models.layers import prepack_linears
from raylm.models.loader import load_hf_config, load_model
from raylm.models.parallel_state import CommClock, get_ep_group, get_pp_group, get_tp_group

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str) -> None:
        self.config = config
        self.model_path = model_path
        self.hf_config = load_hf_config(model_path)
        self.dtype = config.model.torch_dtype
        self.kv_dtype = config.cache.torch_kv_dtype(self.dtype)
        self.block_size = config.cache.block_size
        use_kernel = config.model.cpu_attention == "kernel" and cpu_paged_attention.available()
        self.batch = InputBatch(self.block_size, decode_kernel=use_kernel)
        self.sampler = Sampler()
        self.model = None
        self.kv_caches: List[torch.Tensor] = []
        self.last_step_times: Dict[str, float] = {}  # seconds per phase of the latest step (bench step)

    def load_model(self) -> None:
        self.model = load_model(self.model_path, self.hf_config, self.dtype)
        if self.config.model.cpu_linear == "onednn":
            prepack_linears(self.model)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]

    def kv_bytes_per_block(self) -> int:
        a = self.attn_layers[0]
        return 2 * len(self.attn_layers) * self.block_size * a.num_kv_heads * a.head_dim * self.kv_dtype.itemsize

    def determine_num_blocks(self) -> int:
        """Blocks that fit the budget: `num_blocks` if set, else `kv_cache_memory` (bytes, or a
        fraction of currently available memory). The default, 0.3 of available memory capped
        at 4 GiB, is split over the DP replicas: on one node they share that memory, and each
        replica touches its whole budget under sustained load (prefix-cache LRU), so dp
        full budgets would add up to dp x 4 GiB. On a multi-node cluster, set it explicitly."""
        cache = self.config.cache
        if cache.num_blocks:
            return cache.num_blocks
        budget = parse_memory(cache.kv_cache_memory) if cache.kv_cache_memory is not None else None
        available = psutil.virtual_memory().available
        if budget is None:
            budget = min(int(0.3 * available), 4 << 30) // self.config.parallel.data_parallel_size
        elif isinstance(budget, float):
            budget = int(budget * available)
        return max(1, budget // self.kv_bytes_per_block())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.kv_caches = []
        for layer in self.attn_layers:
            shape = (2, layer.num_kv_heads, num_blocks, self.block_size, layer.head_dim)
            layer.kv_cache = lazy_zeros(shape, self.kv_dtype)
            self.kv_caches.append(layer.kv_cache)

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
                    self._forward(dummy_step())  # join every collective of the busy ranks' step
                return ModelRunnerOutput({}, timings={"dummy": clock.since_start(), "comm": CommClock.take()},
                                         dp_unfinished=busy)
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
        if step.sample_req_ids:
            logits = self.model.compute_logits(hidden[step.logits_rows])  # a TP collective: every rank
            clock.mark("logits")
            if get_tp_group().rank != 0:
                return ModelRunnerOutput({})  # only TP rank 0 of the last stage samples
            result = self.sampler(logits, [self._sampling_input(r) for r in step.sample_req_ids])
            for req_id, token, lp in zip(step.sample_req_ids, result.token_ids, result.logprobs):
                sampled[req_id] = [token]
                if lp is not None:
                    logprobs[req_id] = [lp]
            clock.mark("sample")
        self.last_step_times = {**clock.times, "comm": CommClock.take()}
        return ModelRunnerOutput(sampled, logprobs, self.last_step_times, busy if ep.dp is not None else None)

    def _forward(self, step) -> Optional[torch.Tensor]:
        """The model's forward for this stage: receive (hidden, residual) from the previous
        stage, run our layers, and send them on (returns None) or return the final hidden."""
        pp = get_pp_group()
        intermediate = None
        if not pp.is_first:
            shape = (step.input_ids.shape[0], self.hf_config.hidden_size)
            intermediate = tuple(pp.recv_prev(shape, self.dtype, 2))
        out = self.model(step.input_ids, step.positions, step.meta, intermediate)
        if pp.is_last:
            return out
        pp.send_next(out)
        return None

    def _sampling_input(self, req_id: str) -> SamplingInput:
        state = self.batch.requests[req_id]
        return SamplingInput(state.sampling_params, state.prompt_token_ids, state.output_token_ids)


def dummy_step() -> StepInputs:
    """A lockstep dummy forward: one token at position 0 that attends to itself and writes
    no KV (it owns no cache slot). It makes every collective call a real step makes."""
    meta = AttentionMetadata(torch.zeros(1, dtype=torch.long), prefills=[PrefillSeq(0, 1, 1, None)], store_kv=False)
    return StepInputs(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), meta, [], [], [])


def lazy_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS maps on first write: numpy's zeros is calloc, which
    takes fresh zero pages for large sizes, where torch.zeros writes every byte at once.
    So a replica's resident KV memory follows what it has used, not its whole budget."""
    import numpy as np

    item = torch.tensor([], dtype=dtype).element_size()
    raw = np.zeros(shape, dtype={4: np.float32, 2: np.int16, 1: np.int8}[item])
    return torch.from_numpy(raw).view(dtype)


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
