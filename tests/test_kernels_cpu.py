"""The compiled CPU paged-decode kernel equals the torch reference path, and both equal a
dense softmax attention written out in the test."""
from __future__ import annotations


import pytest
import torch

from raylm.attention import AttentionMetadata, create_attention_backend
from raylm.kernels import cpu_ops, cpu_paged_attention, reference

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
        # [H, NB, D, BS]
        k_stored = cache[0].view(cache.shape[1], cache.shape[2], cache.shape[4], cache.shape[3])
        k = k_stored[:, blocks].transpose(-1, -2).flatten(1, 2)[:, :lens[s]].float()  # [Hkv, L, D]
        v = cache[1][:, blocks].flatten(1, 2)[:, :lens[s]].float()
        k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
        w = torch.softmax(torch.einsum("hd,hld->hl", q[s].float(), k) * scale, -1)
        outs.append(torch.einsum("hl,hld->hd", w, v))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs, hq, hkv, d, bs", [
    (1, 4, 4, 32, 4), (5, 9, 3, 64, 16), (7, 8, 2, 16, 8),
    # the bf16 fast path (block 16, head dim 64/128): groups of 1, 3, 8 (two passes of 4) and
    # 4 at head dim 128 (two passes of 2)
    (4, 2, 2, 64, 16), (3, 8, 1, 64, 16), (6, 8, 2, 128, 16), (2, 6, 2, 128, 16)])
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


# ---- the fused element-wise ops (kernels/cpu_ops.c) against their torch references ------

CPU_OPS = pytest.mark.skipif(not cpu_ops.available(), reason="the C kernels need a C compiler")
OPS_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture
def poisoned(monkeypatch):
    """The kernels' outputs start as NaN: an element they fail to write fails the test."""
    monkeypatch.setattr(cpu_ops, "_empty",
                        lambda *shape, dtype: torch.full(shape, float("nan"), dtype=dtype))



@CPU_OPS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 40])
@pytest.mark.parametrize("n", [96, 100])  # whole AVX-512 vectors (bf16: the vector path), or not
def test_add_rms_norm_matches_reference(gen, poisoned, dtype, rows, n):
    g = gen
    x, res, w = (torch.randn(*s, generator=g).to(dtype) for s in ((rows, n), (rows, n), (n,)))
    x[0, 5] = float("nan")  # a NaN stays in its row (and rounds to a NaN in bf16)
    got, want = cpu_ops.rms_norm(x, w, 1e-6, res), reference.rms_norm(x, w, 1e-6, res)
    assert torch.equal(got[1].isnan(), want[1].isnan()) and torch.equal(got[0].isnan(),
                                                                        want[0].isnan())
    ok = ~want[1].isnan()
    assert torch.equal(got[1][ok], want[1][ok]), "x + residual is one rounding: it must be exact"
    torch.testing.assert_close(got[0][1:], want[0][1:], atol=OPS_TOL[dtype], rtol=OPS_TOL[dtype])
    x = x[:, :96]
    x[0, 5] = 1.0
    heads = x.reshape(rows, 3, 32)  # per-head norm (Qwen3's q/k norm) on strided rows
    torch.testing.assert_close(cpu_ops.rms_norm(heads, w[:32], 1e-5),
                               reference.rms_norm(heads, w[:32], 1e-5), atol=OPS_TOL[dtype],
                               rtol=OPS_TOL[dtype])


@CPU_OPS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("neox", [True, False])
def test_rotary_in_place_matches_reference(gen, dtype, neox):
    g = gen
    tokens, hq, hkv, d = 5, 6, 2, 64
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g).to(dtype)
    q, k = qkv[:, :hq * d].view(tokens, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    angles = torch.rand(32, d // 2, generator=g) * 6
    pos = torch.randint(0, 32, (tokens,), generator=g)
    want = reference.rotary(pos, q.float(), k.float(), angles.cos(), angles.sin(), neox)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    cpu_ops.rotary(pos, q, k, angles.cos(), angles.sin(), neox)
    for got, ref in zip((q, k), want):
        torch.testing.assert_close(got.float(), ref, atol=OPS_TOL[dtype], rtol=OPS_TOL[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)


@CPU_OPS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 33])
def test_silu_and_mul_matches_reference(gen, poisoned, dtype, rows):
    x = (torch.randn(rows, 2 * 200, generator=gen) * 3).to(dtype)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x).float(), reference.silu_and_mul(x.float()),
                               atol=OPS_TOL[dtype], rtol=OPS_TOL[dtype])


@CPU_OPS
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_the_backends_index_path(gen, dtype):
    """The C store writes the cpu backend's layout (K transposed per block) exactly as its
    torch index path does, and nothing else."""
    from raylm.attention.cpu_backend import CpuAttentionBackend

    g = gen
    hkv, d, bs, nb, tokens = 2, 16, 4, 6, 9
    qkv = torch.randn(tokens, 3 * hkv * d, generator=g).to(dtype)
    k, v = (qkv[:, hkv * d:2 * hkv * d].view(tokens, hkv, d),
            qkv[:, 2 * hkv * d:].view(tokens, hkv, d))
    slots = torch.randperm(nb * bs, generator=g)[:tokens]
    got, want = (torch.full((2, hkv, nb, bs, d), float("nan"), dtype=dtype) for _ in range(2))
    cpu_ops.store_kv(got, k, v, slots)
    kv, blocks, offsets = CpuAttentionBackend._k_view(want), slots // bs, slots % bs
    kv[:, blocks, :, offsets] = k
    want[1][:, blocks, offsets] = v.transpose(0, 1)
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)


@pytest.mark.skipif(not cpu_ops.gemv_available(),
                    reason="the bf16 GEMV needs AVX512-BF16 and a C compiler")
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_a_float_matmul(gen, poisoned, rows, bias):
    """K = 600 (not a multiple of 32: the tail loop), N = 70, up to 8 rows (two passes of 4),
    against an fp32 matmul of the same bf16 values; within one bf16 rounding of the output."""
    g = gen
    x, w = (torch.randn(rows, 600, generator=g).bfloat16(),
            torch.randn(70, 600, generator=g).bfloat16())
    b = torch.randn(70, generator=g).bfloat16() if bias else None
    got = cpu_ops.gemv(x, w, b)
    want = x.float() @ w.float().T + (0 if b is None else b.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=8e-3)


@pytest.mark.skipif(not cpu_ops.gemv_available(),
                    reason="the bf16 GEMV needs AVX512-BF16 and a C compiler")
def test_a_prepacked_bf16_linear_takes_the_gemv_for_few_rows_only(monkeypatch):
    from raylm.models.layers import ColumnParallelLinear

    lin = ColumnParallelLinear(64, [96], bias=True).bfloat16()
    lin.weight.data.normal_(), lin.bias.data.normal_()
    x = torch.randn(20, 64).bfloat16()
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    lin.prepack()
    calls, real = [], cpu_ops.gemv
    monkeypatch.setattr(cpu_ops, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for n in (1, cpu_ops.GEMV_MAX_ROWS, cpu_ops.GEMV_MAX_ROWS + 1, 20):
        torch.testing.assert_close(lin(x[:n]).float(), want[:n], atol=0.1, rtol=2e-2)
    assert calls == [1, cpu_ops.GEMV_MAX_ROWS]
