"""The reference backend: HF transformers `generate` with static batching.

Requests go in workload order, `batch_size` at a time, left-padded. Each batch decodes
max(output_len) tokens for every row (min_new_tokens == max_new_tokens, so EOS cannot end
a row early: EOS is masked, which changes no count). Sampling matches the raylm run:
do_sample, temperature 1.0, top_p 1.0, top_k off. Only each request's own output_len
counts as output tokens; the rows decoded past it are padding, HF's waste.
"""
from __future__ import annotations

import time
from typing import Iterator, List

import torch
from tqdm.auto import tqdm

from raylm.bench.workload import BenchRequest, warmup_requests


def load_hf_model(path: str, dtype: str):
    """(model, pad token id) for the HF checkpoint at `path` in `dtype` ('bfloat16', ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return model, (pad if pad is not None else 0)


def batches(requests: List[BenchRequest], batch_size: int) -> Iterator[List[BenchRequest]]:
    """Consecutive slices of `requests`, `batch_size` long (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"hf batch size must be >= 1 (got {batch_size})")
    for start in range(0, len(requests), batch_size):
        yield requests[start:start + batch_size]


def left_pad(prompts: List[List[int]], pad_id: int):
    """(input_ids, attention_mask) tensors, prompts right-aligned behind pad_id."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate_batch(model, batch: List[BenchRequest], pad_id: int) -> int:
    """Decode one static batch; returns the number of new tokens per row that HF produced."""
    ids, mask = left_pad([r.prompt_token_ids for r in batch], pad_id)
    new = max(r.output_len for r in batch)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad_id)
    return out.shape[1] - ids.shape[1]


def run_hf(path: str, requests: List[BenchRequest], dtype: str = "bfloat16", batch_size: int = 32,
           seed: int = 0, use_tqdm: bool = True) -> dict:
    """Load the model, warm up, then time static-batched generation of every request.
    Returns elapsed_s, output_lens (each request's counted tokens) and batching facts."""
    model, pad_id = load_hf_model(path, dtype)
    torch.manual_seed(seed)
    with torch.inference_mode():
        generate_batch(model, warmup_requests(requests), pad_id)
        produced, counted = 0, []
        chunks = list(batches(requests, batch_size))
        start = time.perf_counter()
        for batch in tqdm(chunks, desc="HF batches", disable=not use_tqdm):
            rows = generate_batch(model, batch, pad_id)
            produced += rows * len(batch)
            counted += [min(rows, r.output_len) for r in batch]
        elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_lens": counted, "batch_size": batch_size,
            "num_batches": len(chunks), "decoded_tokens_incl_padding": produced,
            "length_mismatches": sum(c != r.output_len for c, r in zip(counted, requests))}

