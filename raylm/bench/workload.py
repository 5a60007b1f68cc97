"""Synthetic benchmark workloads with exact token counts ("workload A" in DESIGN.md).

Prompts are built from words that are single tokens of the model's tokenizer (' word'
re-encodes to exactly one id), so a prompt of N words is exactly N tokens, and the token
ids are known without running the tokenizer on the whole prompt.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import List, Optional

import numpy as np

_WORD = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")


@dataclass
class WorkloadSpec:
    """Parameters of a seeded synthetic workload; the defaults are workload A."""

    num_prompts: int = 64
    seed: int = 0
    input_median: float = 150.0
    input_sigma: float = 0.9
    input_min: int = 16
    input_max: int = 512
    output_median: float = 100.0
    output_sigma: float = 0.8
    output_min: int = 16
    output_max: int = 256
    fixed_input_len: Optional[int] = None
    fixed_output_len: Optional[int] = None

    def to_dict(self) -> dict:
        """The parameters as a plain dict (for JSON reports)."""
        return asdict(self)


@dataclass
class BenchRequest:
    """One request: exact prompt token ids, the matching text, and the exact output length."""

    prompt_token_ids: List[int]
    prompt: str
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def single_token_words(tokenizer) -> List[tuple]:
    """(token id, word) pairs, sorted by id, for every token that decodes to a plain word
    (letters, then optional digits) and whose ' word' re-encodes to exactly that one id."""
    ids = range(len(tokenizer))
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in ids])
    candidates = [(i, t.strip()) for i, t in zip(ids, texts)
                  if i not in special and _WORD.match(t.strip() or "-")]
    encoded = tokenizer([" " + w for _, w in candidates], add_special_tokens=False)["input_ids"]
    words = [(i, w) for (i, w), enc in zip(candidates, encoded) if list(enc) == [i]]
    if not words:
        raise ValueError("the tokenizer has no single-token words; cannot build an exact-length "
                         "workload")
    return words


def sample_lengths(rng: np.random.Generator, n: int, median: float, sigma: float,
                   lo: int, hi: int, fixed: Optional[int] = None) -> np.ndarray:
    """n integer lengths: lognormal(ln median, sigma), rounded and clipped to [lo, hi];
    all equal to `fixed` when given (the rng is still advanced, so other draws don't shift)."""
    if lo < 1 or hi < lo:
        raise ValueError(f"length clip must satisfy 1 <= min <= max (got {lo}..{hi})")
    draws = rng.lognormal(mean=np.log(median), sigma=sigma, size=n)
    lengths = np.clip(np.rint(draws), lo, hi).astype(np.int64)
    if fixed is not None:
        if fixed < 1:
            raise ValueError(f"fixed length must be >= 1 (got {fixed})")
        lengths = np.full(n, fixed, dtype=np.int64)
    return lengths


def build_workload(spec: WorkloadSpec, tokenizer, verify: bool = True) -> List[BenchRequest]:
    """Draw the requests of `spec` for `tokenizer`. Same spec + tokenizer -> same requests.

    With `verify`, every prompt text is re-encoded and must give exactly its token ids."""
    if spec.num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1 (got {spec.num_prompts})")
    rng = np.random.default_rng(spec.seed)
    in_lens = sample_lengths(rng, spec.num_prompts, spec.input_median, spec.input_sigma,
                             spec.input_min, spec.input_max, spec.fixed_input_len)
    out_lens = sample_lengths(rng, spec.num_prompts, spec.output_median, spec.output_sigma,
                              spec.output_min, spec.output_max, spec.fixed_output_len)
    vocab = single_token_words(tokenizer)
    requests = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        requests.append(random_request(rng, vocab, n_in, int(n_out)))
    if verify:
        _verify(requests, tokenizer)
    return requests


def random_request(rng: np.random.Generator, words: List[tuple], n_in: int,
                   n_out: int) -> BenchRequest:
    """A prompt of `n_in` random single-token words (`single_token_words`), asking for `n_out`."""
    picks = rng.integers(0, len(words), size=n_in)
    return BenchRequest([words[k][0] for k in picks], "".join(" " + words[k][1] for k in picks),
                        n_out)


def _verify(requests: List[BenchRequest], tokenizer) -> None:
    encoded = tokenizer([r.prompt for r in requests], add_special_tokens=False)["input_ids"]
    for k, (req, enc) in enumerate(zip(requests, encoded)):
        if list(enc) != req.prompt_token_ids:
            raise ValueError(f"workload prompt {k} does not re-encode to its token ids "
                             f"({len(enc)} vs {req.prompt_len} tokens); the tokenizer merges "
                             "across words")


def warmup_requests(requests: List[BenchRequest], n: int = 4,
                    max_len: int = 64) -> List[BenchRequest]:
    """A few short requests shaped like the first `n` (a batched prefill, then decodes),
    with every prompt rotated by one token so the timed run gets no prefix-cache hits."""
    warm = []
    for req in requests[:n]:
        ids = (req.prompt_token_ids[1:] + req.prompt_token_ids[:1])[:max_len]
        warm.append(BenchRequest(ids, "", 4))
    return warm


def summarize(requests: List[BenchRequest]) -> dict:
    """Token totals and length ranges of a workload (for reports)."""
    ins = [r.prompt_len for r in requests]
    outs = [r.output_len for r in requests]
    return {"num_requests": len(requests), "prompt_tokens": sum(ins), "output_tokens": sum(outs),
            "prompt_len_min": min(ins), "prompt_len_max": max(ins),
            "prompt_len_median": float(np.median(ins)),
            "output_len_min": min(outs), "output_len_max": max(outs),
            "output_len_median": float(np.median(outs))}


def add_workload_args(parser) -> None:
    """Workload A's knobs as command-line options (shared by every benchmark that draws it)."""
    group = parser.add_argument_group("workload (defaults: workload A)")
    defaults = WorkloadSpec()
    for name in ["input_median", "input_sigma", "output_median", "output_sigma"]:
        group.add_argument("--" + name.replace("_", "-"), type=float,
                           default=getattr(defaults, name))
    for name in ["input_min", "input_max", "output_min", "output_max", "fixed_input_len",
                 "fixed_output_len"]:
        group.add_argument("--" + name.replace("_", "-"), type=int,
                           default=getattr(defaults, name))


def workload_spec(args) -> WorkloadSpec:
    """The WorkloadSpec named by the command-line options (seed: --seed)."""
    fields = WorkloadSpec.__dataclass_fields__
    return WorkloadSpec(**{k: getattr(args, k) for k in fields if k != "seed"}, seed=args.seed)
