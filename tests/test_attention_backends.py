"""Every attention backend against a dense softmax attention written out here: each writes
the same tokens' K/V through its own `store_kv` (its own layout), then decodes and prefills
(fresh, and chunked over a cached context) from its paged cache. Plus the registry."""
from __future__ import annotations

import pytest
import torch

from raylm.attention import (AttentionMetadata, BaseAttentionBackend, KVCachePool, PrefillSeq,
                             attention_backend_names, create_attention_backend)
from raylm.attention.torch_backend import TorchAttentionBackend
from raylm.kernels import cpu_paged_attention
from raylm.kernels.triton_support import triton_runs_on

CPU = torch.device("cpu")
BACKENDS = ["torch"] + (["cpu"] if cpu_paged_attention.available() else []) + \
    (["triton"] if triton_runs_on(CPU) else [])


def _dense(q, k, v, q_pos, scale):
    """q [n, Hq, D] at absolute positions q_pos; k, v [L, Hkv, D] for positions 0..L-1."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)
    scores = torch.einsum("nhd,lhd->nhl", q.float(), k) * scale
    mask = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]
    probs = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1)
    return torch.einsum("nhl,lhd->nhd", probs, v)


def _setup(name, dtype, lens, hq=6, hkv=2, d=16, bs=4, seed=0):
    """A pool holding sequences of `lens` tokens (their blocks shuffled) and their K/V."""
    g = torch.Generator().manual_seed(seed)
    backend = create_attention_backend(name, CPU, dtype)
    nbs = [-(-n // bs) for n in lens]
    pool = KVCachePool(backend, 1, sum(nbs) + 2, bs, hkv, d, dtype)
    perm = torch.randperm(sum(nbs) + 2, generator=g)[:sum(nbs)].split(nbs)
    seqs = []
    for n, blocks in zip(lens, perm):
        k, v = torch.randn(n, hkv, d, generator=g), torch.randn(n, hkv, d, generator=g)
        slots = blocks.repeat_interleave(bs)[:n] * bs + torch.arange(n) % bs
        pool.store_kv(0, k, v, slots)
        seqs.append((k.to(dtype), v.to(dtype), blocks))
    return backend, pool, seqs, g


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_dense(name, dtype):
    if name == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter gets bf16 wrong (tests/test_triton_kernels.py covers it "
                    "on CUDA)")
    lens = [1, 7, 13, 4]
    backend, pool, seqs, g = _setup(name, dtype, lens)
    nb = max(len(b) for _, _, b in seqs)
    table = torch.stack([torch.cat([b, b.new_zeros(nb - len(b))]) for _, _, b in seqs])
    q = torch.randn(len(lens), 6, 16, generator=g)
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), len(lens), table,
                             torch.tensor(lens))
    meta = backend.build_metadata(meta, 4)
    got = backend.forward(q.to(dtype), None, None, pool.layer(0), meta, 0.25)
    want = torch.cat([_dense(q[i:i + 1], k, v, torch.tensor([n - 1]), 0.25)
                      for i, (n, (k, v, _)) in enumerate(zip(lens, seqs))])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", BACKENDS)
def test_mixed_step_with_fresh_and_chunked_prefill_equals_dense(name):
    """One decode, one fresh prefill (nothing cached), one chunk after 9 cached tokens."""
    backend, pool, seqs, g = _setup(name, torch.float32, [6, 5, 14])
    (k0, v0, b0), (k1, v1, b1), (k2, v2, b2) = seqs
    q = torch.randn(1 + 5 + 5, 6, 16, generator=g)
    k = torch.cat([k0[-1:], k1, k2[9:]])
    v = torch.cat([v0[-1:], v1, v2[9:]])
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), 1, b0[None], torch.tensor([6]),
                             prefills=[PrefillSeq(1, 5, 5, b1), PrefillSeq(6, 5, 14, b2)])
    got = backend.forward(q, k, v, pool.layer(0), backend.build_metadata(meta, 4), 0.25)
    want = torch.cat([_dense(q[:1], k0, v0, torch.tensor([5]), 0.25),
                      _dense(q[1:6], k1, v1, torch.arange(5), 0.25),
                      _dense(q[6:], k2, v2, torch.arange(9, 14), 0.25)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_picks_per_device_and_bad_names_are_refused():
    auto = create_attention_backend("auto", CPU, torch.float32)
    assert auto.name == ("cpu" if cpu_paged_attention.available() else "torch")
    # the C kernel reads fp32/bf16 caches only: fp16 falls back to the reference
    assert create_attention_backend("auto", CPU, torch.float16).name == "torch"
    named = r"attention_backend must be one of auto, .*\(got 'flash'\)"
    with pytest.raises(ValueError, match=named):
        create_attention_backend("flash", CPU, torch.float32)
    with pytest.raises(ValueError, match="cannot run on cuda"):
        create_attention_backend("cpu", torch.device("cuda"), torch.float32)
    from raylm.llm import build_engine_config

    with pytest.raises(ValueError, match="attention_backend must be one of"):
        build_engine_config(attention_backend="flash")
    assert {"auto", "torch", "cpu", "triton"} <= set(attention_backend_names())


def test_pool_sizes_blocks_from_the_backend_layout():
    backend = create_attention_backend("torch", CPU, torch.bfloat16)
    per_block = KVCachePool.bytes_per_block(backend, 30, 16, 3, 64, torch.bfloat16)
    assert per_block == 30 * 2 * 16 * 3 * 64 * 2  # layers x (K, V) x tokens x heads x dim x bytes
    pool = KVCachePool(backend, 30, 10, 16, 3, 64, torch.bfloat16)
    assert pool.buffer.numel() * 2 == 10 * per_block and isinstance(backend, BaseAttentionBackend)
    assert isinstance(backend, TorchAttentionBackend)
