"""The compiled CPU paged-decode kernel equals the torch reference path, and both equal a
dense softmax attention written out in the test."""
from __future__ import annotations

import pytest
import torch

from raylm.attention import AttentionMetadata, create_attention_backend
from raylm.kernels import cpu_paged_attention

pytestmark = pytest.mark.skipif(not cpu_paged_attention.available(), reason="no C compiler")


def _case(seed, num_seqs, hq, hkv, d, bs, dtype):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 5 * bs, (num_seqs,), generator=g)
    nb_max = int(-(-lens.max() // bs))
    num_blocks = num_seqs * nb_max + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:num_seqs * nb_max].view(num_seqs, nb_max).clone()
    cache = torch.randn(2, hkv, num_blocks, bs, d, generator=g).to(dtype)
    q = torch.randn(num_seqs, hq, d, generator=g)
    return q, cache, tables, lens


def _dense(q, cache, tables, lens, scale):
    """Plain attention over each sequence's tokens, rebuilt from the block table."""
    hq, hkv = q.shape[1], cache.shape[1]
    outs = []
    for s in range(q.shape[0]):
        blocks = tables[s]
        k_stored = cache[0].view(cache.shape[1], cache.shape[2], cache.shape[4], cache.shape[3])  # [H, NB, D, BS]
        k = k_stored[:, blocks].transpose(-1, -2).flatten(1, 2)[:, :lens[s]].float()  # [Hkv, L, D]
        v = cache[1][:, blocks].flatten(1, 2)[:, :lens[s]].float()
        k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
        w = torch.softmax(torch.einsum("hd,hld->hl", q[s].float(), k) * scale, -1)
        outs.append(torch.einsum("hl,hld->hd", w, v))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs, hq, hkv, d, bs", [(1, 4, 4, 32, 4), (5, 9, 3, 64, 16), (7, 8, 2, 16, 8)])
def test_kernel_equals_torch_and_dense(dtype, num_seqs, hq, hkv, d, bs):
    q, cache, tables, lens = _case(num_seqs * hq, num_seqs, hq, hkv, d, bs, dtype)
    scale = d ** -0.5
    got = cpu_paged_attention.paged_decode(q, cache, tables, lens, scale)
    dense = _dense(q, cache, tables, lens, scale)
    # the cpu backend's torch path (the same layout, K transposed in each block)
    backend = create_attention_backend("cpu", torch.device("cpu"), dtype)
    mask = (torch.arange(tables.shape[1] * bs) < lens.unsqueeze(1))[:, None, :]
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), num_seqs, tables, lens, mask)
    ref = super(type(backend), backend).decode(q.to(dtype), cache, meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, dense, atol=tol, rtol=tol)
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_loading_the_kernel_keeps_subnormal_floats():
    """Loading the library must not switch the process to flush-to-zero (what linking with
    -ffast-math does); whether to flush is the engine's choice. In a fresh process: an
    engine built earlier in this one has already chosen."""
    import subprocess
    import sys

    code = ("from raylm.kernels import cpu_paged_attention as k; assert k.load() is not None; "
            "x = 5e-324; assert x != 0.0 and 1e-310 / 2 > 0, 'subnormals flushed'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
