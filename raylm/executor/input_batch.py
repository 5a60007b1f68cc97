"""Worker-side request state, kept across steps and updated from SchedulerOutput diffs, and
the flattening of one step into model inputs (ids, positions, slots, attention metadata)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

from raylm.attention import AttentionMetadata, BaseAttentionBackend, PrefillSeq, to_device
from raylm.executor.sched_output import SchedulerOutput
from raylm.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]  # prompt + outputs known to this worker
    sampling_params: SamplingParams
    block_ids: List[int]
    num_computed_tokens: int

    @property
    def output_token_ids(self) -> List[int]:
        return self.token_ids[len(self.prompt_token_ids):]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    req_ids: List[str]  # batch order (decodes first)
    logits_rows: torch.Tensor  # hidden-state row per request that samples this step
    sample_req_ids: List[str]
    # requests that want prompt logprobs: (req_id, first row, the prompt tokens its rows predict)
    prompt_rows: List[Tuple[str, int, List[int]]] = field(default_factory=list)


class InputBatch:
    """Builds each step's tensors on the host, then copies them to the backend's device once
    (pinned, non-blocking on CUDA); the backend completes the attention metadata."""

    def __init__(self, block_size: int, backend: BaseAttentionBackend) -> None:
        self.block_size = block_size
        self.backend = backend
        self.requests: Dict[str, CachedRequestState] = {}

    def update(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                new.req_id, list(new.prompt_token_ids),
                list(new.prompt_token_ids) + list(new.output_token_ids), new.sampling_params,
                list(new.block_ids), new.num_computed_tokens)
        c = sched.scheduled_cached_reqs
        for req_id, tokens, blocks, computed in zip(c.req_ids, c.new_token_ids, c.new_block_ids,
                                                    c.num_computed_tokens):
            state = self.requests[req_id]
            state.token_ids.extend(tokens)
            state.block_ids.extend(blocks)
            state.num_computed_tokens = computed

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        order = sorted(sched.num_scheduled_tokens,
                       key=lambda r: sched.num_scheduled_tokens[r] != 1)
        ids, positions, slots, logits_rows, sample_ids, prompt_rows = [], [], [], [], [], []
        prefills, decode_states = [], []
        for req_id in order:
            state, n = self.requests[req_id], sched.num_scheduled_tokens[req_id]
            start, row = state.num_computed_tokens, len(ids)
            ids.extend(state.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            slots.extend(self._slot(state.block_ids, p) for p in range(start, start + n))
            if n == 1:
                decode_states.append(state)
            else:
                prefills.append(PrefillSeq(row, n, start + n,
                                           self._block_ids(state.block_ids, start + n)))
            targets = self._prompt_targets(state, start, n)
            if targets:
                prompt_rows.append((req_id, row, targets))
            if start + n == len(state.token_ids):  # reached the end: this step samples
                logits_rows.append(row + n - 1)
                sample_ids.append(req_id)
            state.num_computed_tokens = start + n
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long), len(decode_states),
                                 prefills=prefills)
        if decode_states:
            meta.decode_block_table, meta.decode_lens = self._decode_tables(decode_states)
        device = self.backend.device
        return StepInputs(to_device(torch.tensor(ids, dtype=torch.long), device),
                          to_device(torch.tensor(positions, dtype=torch.long), device),
                          self.backend.build_metadata(meta, self.block_size), order,
                          to_device(torch.tensor(logits_rows, dtype=torch.long), device),
                          sample_ids, prompt_rows)

    @staticmethod
    def _prompt_targets(state: CachedRequestState, start: int, n: int) -> List[int]:
        """The prompt tokens that positions start..start+n-1 predict, if the request wants
        prompt logprobs (the last prompt position predicts the first output: not one)."""
        if state.sampling_params.prompt_logprobs is None:
            return []
        end = min(start + n, len(state.prompt_token_ids) - 1)
        return state.prompt_token_ids[start + 1:end + 1]

    def _slot(self, block_ids: List[int], pos: int) -> int:
        return block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def _block_ids(self, block_ids: List[int], length: int) -> torch.Tensor:
        return torch.tensor(block_ids[:-(-length // self.block_size)], dtype=torch.long)

    def _decode_tables(self, states: List[CachedRequestState]):
        """[D, nb] block tables (padded with block 0, never read past each length) and
        lengths. num_computed_tokens already counts this step's token."""
        lens = [s.num_computed_tokens for s in states]
        nb = -(-max(lens) // self.block_size)
        table = [s.block_ids[:nb] + [0] * (nb - min(nb, len(s.block_ids))) for s in states]
        return torch.tensor(table, dtype=torch.long), torch.tensor(lens, dtype=torch.long)
