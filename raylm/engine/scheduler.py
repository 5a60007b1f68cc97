"""Token-budget continuous-batching scheduler with chunked prefill and preemption by recompute.

There are no phases: every request has `num_computed_tokens` and wants to reach
`num_tokens`; a step hands out at most `max_num_batched_tokens`. Running requests go
first (oldest first); when blocks run out the newest running request is preempted
(its blocks freed, recomputed later, usually from the prefix cache). Waiting requests
are admitted only in steps that preempted nothing.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import Deque, Dict, Iterable, List, Optional

from raylm.config import CacheConfig, SchedulerConfig
from raylm.engine.kv_cache_manager import KVCacheManager
from raylm.engine.request import Request, RequestStatus
from raylm.executor.sched_output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput,
                                         NewRequestData, SchedulerOutput)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int, max_model_len: int) -> None:
        self.config = scheduler_config
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.requests: Dict[str, Request] = {}
        self.waiting: Deque[Request] = deque()
        self.running: List[Request] = []
        self._forget: set = set()  # finished/preempted since the last SchedulerOutput
        self._preempted_this_step = False
        self.num_preemptions = 0
        # Scheduled, output not yet applied. Only non-empty with several steps in flight
        # (pipeline parallelism): such a request is neither scheduled again nor preempted.
        self.in_flight: set = set()
        self.last_grammar_s = 0.0  # the latest step's bitmask filling

    # ---- queue management --------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step ----------------------------------------------------------------

    def schedule(self, max_requests: Optional[int] = None) -> SchedulerOutput:
        """Running requests first (oldest first, preempting the newest when blocks run out),
        then waiting ones while budget, blocks and max_num_seqs allow (not after a preemption).
        `max_requests` caps this step's batch (pipeline parallelism splits requests over the
        batches in flight)."""
        num_scheduled: Dict[str, int] = {}
        self._limit = max_requests or self.config.max_num_seqs
        self._preempted_this_step = False
        budget = self.config.max_num_batched_tokens
        cached, budget = self._schedule_running(budget, num_scheduled)
        new_reqs = ([] if self._preempted_this_step
                    else self._schedule_waiting(budget, num_scheduled))
        forget, self._forget = self._forget, set()
        self.in_flight.update(num_scheduled)
        out = SchedulerOutput(new_reqs, cached, num_scheduled, sum(num_scheduled.values()), forget)
        start = time.perf_counter()
        out.grammar_req_ids, out.grammar_bitmask = self._grammar_bitmask(num_scheduled)
        self.last_grammar_s = time.perf_counter() - start  # `raylm bench structured`
        return out

    def _grammar_bitmask(self, num_scheduled: Dict[str, int]):
        """A bitmask row per constrained request whose scheduled tokens reach its end (it
        samples this step), filled by its grammar."""
        ids = [r for r, n in num_scheduled.items() if self.requests[r].grammar is not None
               and self.requests[r].num_computed_tokens + n == self.requests[r].num_tokens]
        if not ids:
            return [], None
        bitmask = self.requests[ids[0]].grammar.allocate_bitmask(len(ids))
        for row, req_id in enumerate(ids):
            self.requests[req_id].grammar.fill_bitmask(bitmask, row)
        return ids, bitmask

    def _schedule_running(self, budget: int, num_scheduled: Dict[str, int]):
        cached = CachedRequestData()
        i = 0
        while i < len(self.running) and budget > 0 and len(num_scheduled) < self._limit:
            request = self.running[i]
            if request.request_id in self.in_flight:
                # its last step has not come back (pipeline parallelism): nothing to run yet
                i += 1
                continue
            n = self._num_new_tokens(request, budget)
            if not self._make_room(request, n):
                break  # the request itself was preempted; everything after it too
            self._add_cached(cached, request, self.kv.allocate(request, n))
            num_scheduled[request.request_id] = n
            budget -= n
            i += 1
        return cached, budget

    def _schedule_waiting(self, budget: int,
                          num_scheduled: Dict[str, int]) -> List[NewRequestData]:
        new_reqs: List[NewRequestData] = []
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
                and len(num_scheduled) < self._limit):
            request = self.waiting[0]
            # a hit would skip the positions that prompt logprobs come from: recompute them
            computed, num_hit = (([], 0) if request.needs_prompt_logprobs
                                 else self.kv.get_computed_blocks(request))
            # The KV manager counts the hits itself (request.num_computed_tokens + len(computed) *
            # block_size), so num_computed_tokens stays 0 until the hits are allocated.
            n = self._num_new_tokens(request, budget, num_hit)
            if not self.kv.can_allocate(request, n, computed):
                break
            block_ids = self.kv.allocate(request, n, computed)
            request.num_computed_tokens = num_hit
            self.waiting.popleft()
            self.running.append(request)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            new_reqs.append(self._new_request_data(request, block_ids))
            num_scheduled[request.request_id] = n
            budget -= n
        return new_reqs

    def _num_new_tokens(self, request: Request, budget: int, num_hit: int = 0) -> int:
        remaining = request.num_tokens - request.num_computed_tokens - num_hit
        return min(remaining, budget, self.config.long_prefill_token_threshold)

    def _make_room(self, request: Request, num_new_tokens: int) -> bool:
        """Preempt the newest running requests until `request` fits; False if it was itself
        preempted, or if the only candidates are in flight (their blocks are being written)."""
        while not self.kv.can_allocate(request, num_new_tokens):
            victim = next((r for r in reversed(self.running)
                           if r.request_id not in self.in_flight), None)
            if victim is None:
                return False
            self.running.remove(victim)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_synced_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_this_step = True
        self._forget.add(request.request_id)
        self.waiting.appendleft(request)

    def _new_request_data(self, request: Request, block_ids: List[int]) -> NewRequestData:
        request.num_synced_tokens = request.num_tokens
        params = request.sampling_params
        if params.prompt_logprobs is not None and not request.needs_prompt_logprobs:
            params = dataclasses.replace(params, prompt_logprobs=None)  # resumed: scored already
        return NewRequestData(request.request_id, request.prompt_token_ids,
                              list(request.output_token_ids), params, block_ids,
                              request.num_computed_tokens)

    @staticmethod
    def _add_cached(cached: CachedRequestData, request: Request, block_ids: List[int]) -> None:
        cached.req_ids.append(request.request_id)
        cached.new_token_ids.append(request.all_token_ids[request.num_synced_tokens:])
        cached.new_block_ids.append(block_ids)
        cached.num_computed_tokens.append(request.num_computed_tokens)
        request.num_synced_tokens = request.num_tokens

    # ---- after the forward pass --------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput,
                           output: ModelRunnerOutput) -> List[EngineCoreOutput]:
        outputs: List[EngineCoreOutput] = []
        self.in_flight.difference_update(sched.num_scheduled_tokens)
        for req_id, n in sched.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            self._collect_prompt_logprobs(request, output.prompt_logprobs.get(req_id))
            request.num_computed_tokens += n
            # Register blocks as soon as they are full, mid chunked prefill too, so a request
            # preempted mid-prefill (or one sharing its prefix) can reuse them.
            self.kv.cache_blocks(request)
            tokens = output.sampled_token_ids.get(req_id) or []
            if not tokens:
                continue  # mid chunked prefill
            for token in tokens:
                request.append_output_token(token)
                status = self._check_stop(request, token)
                if status is not None:
                    self._finish(request, status)
                    break
            outputs.append(EngineCoreOutput(req_id, tokens, output.logprobs.get(req_id),
                                            request.finish_reason, request.stop_reason,
                                            max(request.num_cached_tokens, 0),
                                            self._take_prompt_logprobs(request)))
        return outputs

    @staticmethod
    def _collect_prompt_logprobs(request: Request, positions) -> None:
        """Keep the positions not scored before: entry j of this step scores prompt token
        start + 1 + j (start: the step's first position); a recompute after preemption
        scores some again."""
        start = request.num_computed_tokens
        for j, position in enumerate(positions or ()):
            if start + j == len(request.prompt_logprobs):
                request.prompt_logprobs.append(position)

    @staticmethod
    def _take_prompt_logprobs(request: Request):
        if request.sampling_params.prompt_logprobs is None or request.prompt_logprobs_sent:
            return None
        request.prompt_logprobs_sent = True
        return request.prompt_logprobs

    def _check_stop(self, request: Request, token: int) -> Optional[RequestStatus]:
        params = request.sampling_params
        grammar = request.grammar
        if grammar is not None and (not grammar.accept(token) or grammar.is_terminated()):
            # complete (a rejected token: only from an executor that ignores the mask, the sim)
            request.stop_reason = token if token in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        # all_stop_token_ids = user stop ids + EOS ids (unless ignore_eos), filled by the engine
        if token in params.all_stop_token_ids and request.num_output_tokens >= params.min_tokens:
            request.stop_reason = token if token in params.stop_token_ids else None
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        self._forget.add(request.request_id)
        del self.requests[request.request_id]
