"""Token sampling for one step: logit bias -> penalties -> min_tokens mask -> temperature ->
min-p -> top-k -> top-p -> draw. Logprobs come from the raw logits (vLLM's default).

A seeded request draws from a generator seeded by (seed, output position), so its tokens
do not depend on batch composition, preemption or which worker runs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from raylm.kernels import cpu_ops
from raylm.outputs import Logprob, PositionLogprobs
from raylm.sampling_params import SamplingParams


@dataclass
class SamplingInput:
    """What the sampler needs of one request this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass
class SamplerOutput:
    token_ids: List[int]
    logprobs: List[Optional[PositionLogprobs]]


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype,
                                           device=logits.device)
    return logits


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            seen[torch.tensor(list(row.prompt_token_ids) + list(row.output_token_ids),
                              dtype=torch.long, device=logits.device)] = True
            x = logits[i]
            logits[i] = torch.where(seen,
                                    torch.where(x > 0, x / p.repetition_penalty,
                                                x * p.repetition_penalty), x)
        if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
            ids = torch.tensor(row.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(ids, minlength=vocab)[:vocab]
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    for i, row in enumerate(rows):
        p = row.params
        # a constrained row's grammar decides where it ends (once complete it allows only EOS)
        constrained = p.structured_outputs is not None
        if len(row.output_token_ids) < p.min_tokens and p.all_stop_token_ids and not constrained:
            logits[i, list(p.all_stop_token_ids)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row [V], temperature applied: mask everything outside min-p / top-k / top-p."""
    if params.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        # keep the token that crosses top_p
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _generator(params: SamplingParams, position: int) -> Optional[torch.Generator]:
    if params.seed is None:
        return None
    return torch.Generator().manual_seed((params.seed * 1_000_003 + position)
                                         & 0x7FFF_FFFF_FFFF_FFFF)


def draw(logits: torch.Tensor, rows: Sequence[SamplingInput]) -> List[int]:
    """Batched draw: argmax for greedy rows; the rest sample from softmax(logits / T) after
    their own filters, by inverse CDF (an exponential race needs a random number per vocab
    entry: ~40 ms per step at batch 32 on this CPU)."""
    device = logits.device  # every tensor made here lives beside the logits (CPU or GPU)
    random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(random_rows) < len(rows):
        tokens = logits.argmax(-1)
        if not random_rows:
            return tokens.tolist()
    else:  # all random: a full-vocab argmax would be wasted (~1.3 ms at batch 32)
        tokens = torch.empty(len(rows), dtype=torch.long, device=device)
    scaled = logits if len(random_rows) == len(rows) else logits[random_rows]
    temps = [rows[i].params.temperature for i in random_rows]
    if any(t != 1.0 for t in temps):
        scaled = scaled / torch.tensor(temps, dtype=logits.dtype, device=device).unsqueeze(1)
    for j, i in enumerate(random_rows):
        p = rows[i].params
        if p.min_p > 0 or p.top_k > 0 or p.top_p < 1.0:
            scaled[j] = filter_logits(scaled[j], p)
    # Unnormalized weights suffice for an inverse-CDF draw: skip softmax's sum and divide.
    weights = (scaled - scaled.amax(-1, keepdim=True)).exp_()
    picks = inverse_cdf(weights, [rows[i] for i in random_rows])
    tokens[random_rows] = picks
    return tokens.tolist()


def uniforms(rows: Sequence[SamplingInput], device: torch.device) -> torch.Tensor:
    """One fp32 uniform in [0, 1) per row; a seeded row's comes from its own generator."""
    u = torch.rand(len(rows), dtype=torch.float32, device=device)
    for j, row in enumerate(rows):
        gen = _generator(row.params, len(row.output_token_ids))
        if gen is not None:  # a CPU generator, so a seed gives the same tokens on any device
            u[j] = float(torch.rand(1, generator=gen, dtype=torch.float64))
    return u


def inverse_cdf(weights: torch.Tensor, rows: Sequence[SamplingInput]) -> torch.Tensor:
    """One uniform per row, scaled to the row's total weight and located in its cumulative
    sum (the first token whose sum exceeds it, so zero-weight tokens are never picked).
    `weights` need not be normalized; it is overwritten. torch.multinomial is ~10x slower."""
    cdf = weights.cumsum_(-1)
    u = uniforms(rows, cdf.device).unsqueeze(1)
    picks = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return picks.clamp_(max=cdf.shape[-1] - 1)


def compute_logprobs(raw: torch.Tensor, token: int, top_n: int) -> PositionLogprobs:
    logprobs = torch.log_softmax(raw.float(), -1)
    chosen = float(logprobs[token])
    out: Dict[int, Logprob] = {token: Logprob(chosen, int((logprobs > chosen).sum()) + 1)}
    if top_n:
        values, ids = torch.topk(logprobs, top_n)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(t, Logprob(v, rank))
    return out


def position_logprobs(logits: torch.Tensor, targets: Sequence[int],
                      top_n: int) -> List[PositionLogprobs]:
    """Batched `compute_logprobs` for prompt positions: row j's logits scored against the
    prompt token that follows it, `targets[j]`."""
    logprobs = torch.log_softmax(logits.float(), -1)
    ids = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids.unsqueeze(1))
    ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
    top = torch.topk(logprobs, top_n) if top_n else None
    out = []
    for j, (token, value) in enumerate(zip(targets, chosen.squeeze(1).tolist())):
        position = {token: Logprob(value, ranks[j])}
        if top is not None:
            for rank, (v, t) in enumerate(zip(top.values[j].tolist(), top.indices[j].tolist()),
                                          start=1):
                position.setdefault(t, Logprob(v, rank))
        out.append(position)
    return out


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingInput]) -> SamplerOutput:
        if self._c_path(logits, rows):  # the common case on CPU: no filters, penalties, logprobs
            temps = torch.tensor([r.params.temperature for r in rows], dtype=torch.float32)
            tokens = cpu_ops.sample_rows(logits, temps, uniforms(rows, logits.device))
            return SamplerOutput(tokens.tolist(), [None] * len(rows))
        logits = logits.float()
        if all(self._plain(r) for r in rows):
            return SamplerOutput(logits.argmax(-1).tolist(), [None] * len(rows))
        raw = logits.clone() if any(r.params.logprobs is not None for r in rows) else None
        logits = apply_min_tokens(apply_penalties(apply_logit_bias(logits, rows), rows), rows)
        tokens = draw(logits, rows)
        logprobs = [compute_logprobs(raw[i], tokens[i], row.params.logprobs)
                    if row.params.logprobs is not None else None for i, row in enumerate(rows)]
        return SamplerOutput(tokens, logprobs)

    @classmethod
    def _c_path(cls, logits: torch.Tensor, rows: Sequence[SamplingInput]) -> bool:
        """CPU logits and every row plain (greedy or temperature only): one C call draws all
        (cpu_ops.sample_rows: the same inverse-CDF draw as `draw`, without six passes of
        torch ops and their 6-12 MB temporaries at batch 32-64)."""
        return (logits.device.type == "cpu" and logits.dtype in cpu_ops.DTYPES
                and cpu_ops.available() and all(cls._plain(r, greedy_only=False) for r in rows))

    @staticmethod
    def _plain(row: SamplingInput, greedy_only: bool = True) -> bool:
        """No logprobs, bias, penalties, min_tokens mask, or (unless greedy) filters."""
        p = row.params
        plain = (p.logprobs is None and p.logit_bias is None and p.repetition_penalty == 1.0
                 and not p.frequency_penalty
                 and not p.presence_penalty and len(row.output_token_ids) >= p.min_tokens)
        if p.greedy:
            return plain
        return plain and not greedy_only and p.min_p == 0 and p.top_k <= 0 and p.top_p >= 1.0
