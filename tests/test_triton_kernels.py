"""Every Triton kernel against its torch reference (raylm.kernels.reference) on fresh random
inputs drawn per test, across the edges: one token, lengths at and across block
boundaries, GQA ratios 1/4/8, head sizes 64 and 128, block sizes 16 and 32, a prefill
chunk over a cached prefix, the split-KV path, top-k 1 and 2, experts held elsewhere.
Outputs and scratch buffers are poisoned (NaN) first, so an element a kernel fails to
write fails the comparison. On CPU the kernels run under TRITON_INTERPRET=1 (conftest), in
fp32 and fp16 (the interpreter gets bf16 wrong); on CUDA also in bf16."""
from __future__ import annotations


import pytest
import torch

from raylm.kernels import reference
from raylm.kernels.triton_support import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton is not installed")
DTYPES = [torch.float32, torch.float16] + \
    ([pytest.param(torch.bfloat16, marks=pytest.mark.gpu)] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
NAN = float("nan")



def rand(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


def poisoned(*shape, dtype=torch.float32, device=DEVICE):
    return torch.full(shape, NAN, dtype=dtype, device=device)


@pytest.fixture
def poison_scratch(monkeypatch):
    """Scratch buffers the kernels allocate come back full of NaN."""
    from raylm.kernels import triton_moe, triton_paged_attention

    for module in (triton_moe, triton_paged_attention):
        monkeypatch.setattr(module, "_empty",
                            lambda *shape, dtype, device: poisoned(*shape, dtype=dtype,
                                                                   device=device))


def _paged_batch(gen, q_lens, ctx_lens, hkv, d, block_size, dtype):
    """A cache holding each sequence's context in shuffled blocks (spare blocks NaN: reading
    past a context fails), a q for every new token, and the metadata tensors."""
    blocks = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(blocks) + 3
    k_cache = poisoned(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = poisoned(num_blocks, block_size, hkv, d, dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen)[:sum(blocks)].split(blocks)
    table = torch.zeros(len(ctx_lens), max(blocks), dtype=torch.int32)
    for s, (n, ids) in enumerate(zip(ctx_lens, perm)):
        table[s, :len(ids)] = ids.int()
        pos = torch.arange(n)
        k_cache[ids[pos // block_size], pos % block_size] = rand(gen, n, hkv, d, dtype=dtype)
        v_cache[ids[pos // block_size], pos % block_size] = rand(gen, n, hkv, d, dtype=dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0).int()
    return k_cache, v_cache, cu.to(DEVICE), torch.tensor(ctx_lens, dtype=torch.int32,
                                                         device=DEVICE), \
        table.to(DEVICE)


def _check_attention(gen, q_lens, ctx_lens, group, d, block_size, dtype, segments):
    from raylm.kernels.triton_paged_attention import paged_attention

    hkv = 2
    k_cache, v_cache, cu, lens, table = _paged_batch(gen, q_lens, ctx_lens, hkv, d, block_size,
                                                     dtype)
    q = rand(gen, sum(q_lens), hkv * group, d, dtype=dtype)
    out = poisoned(*q.shape, dtype=dtype)
    paged_attention(q, k_cache, v_cache, out, cu, lens, table, d ** -0.5, max(q_lens), segments)
    want = reference.paged_attention(q, k_cache, v_cache, cu, lens, table, d ** -0.5)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


# (group, head size, block size): every GQA ratio, head size and block size, not every product
SHAPES = [(1, 64, 16), (4, 128, 16), (8, 64, 32), (4, 64, 32)]


@pytest.mark.parametrize("group,d,block_size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segments", [1, 4])
def test_decode_attention(gen, poison_scratch, group, d, block_size, dtype, segments):
    """One token each, contexts of 1, at, across and far past block boundaries."""
    ctx = [1, block_size, block_size + 1, 2 * block_size - 1, 3 * block_size + 5]
    _check_attention(gen, [1] * len(ctx), ctx, group, d, block_size, dtype, segments)


@pytest.mark.parametrize("group,d,block_size", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("segments", [1, 2])
def test_mixed_batch_attention(gen, poison_scratch, group, d, block_size, dtype, segments):
    """Decodes, a fresh prefill, a chunk over a cached prefix crossing block boundaries, a
    one-token prefill chunk: one launch."""
    bs = block_size
    q_lens = [1, 1, 2 * bs + 3, bs + 2, 1]
    ctx_lens = [bs + 1, 7, 2 * bs + 3, 2 * bs + 9, bs]
    _check_attention(gen, q_lens, ctx_lens, group, d, block_size, dtype, segments)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_writes_its_slots_only(gen, dtype, block_size):
    from raylm.kernels.triton_kv_store import store_kv

    hkv, d, tokens = 2, 64, 9
    slots = torch.randperm(4 * block_size, generator=gen)[:tokens].to(DEVICE)
    slots[3] = -1  # a padded row: skipped
    qkv = rand(gen, tokens, (4 + 2 * hkv) * d, dtype=dtype)  # k, v as views into a fused qkv
    k = qkv[:, 4 * d:(4 + hkv) * d].view(tokens, hkv, d)
    v = qkv[:, (4 + hkv) * d:].view(tokens, hkv, d)
    caches = [poisoned(4, block_size, hkv, d, dtype=dtype) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots)
    reference.store_kv(k, v, caches[2], caches[3], slots)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)
    assert caches[0].isnan().sum() == caches[0].numel() - (tokens - 1) * hkv * d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 13])
def test_rms_norm_with_and_without_residual(gen, dtype, tokens):
    from raylm.kernels.triton_layer_ops import rms_norm

    size = 96  # not a power of two: masked columns
    x, res, w = rand(gen, tokens, size, dtype=dtype), rand(gen, tokens, size, dtype=dtype), \
        rand(gen, size, dtype=dtype)
    out, res_out = poisoned(tokens, size, dtype=dtype), poisoned(tokens, size, dtype=dtype)
    got = rms_norm(x, w, 1e-6, res, out=out, residual_out=res_out)
    want = reference.rms_norm(x, w, 1e-6, res)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=TOL[dtype], rtol=TOL[dtype])
    plain = rms_norm(x.view(tokens, 3, 32), w[:32], 1e-5, out=poisoned(tokens, 3, 32, dtype=dtype))
    torch.testing.assert_close(plain, reference.rms_norm(x.view(tokens, 3, 32), w[:32], 1e-5),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_rotary_in_place(gen, dtype, neox, d):
    from raylm.kernels.triton_layer_ops import rotary

    tokens, hq, hkv = 7, 8, 2
    qkv = rand(gen, tokens, (hq + 2 * hkv) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d)
    angles = torch.rand(64, d // 2, generator=gen).to(DEVICE) * 6
    positions = torch.randint(0, 64, (tokens,), generator=gen).to(DEVICE)
    want_q, want_k = reference.rotary(positions, q.float(), k.float(), angles.cos(), angles.sin(),
                                      neox)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    got_q, got_k = rotary(positions, q, k, angles.cos(), angles.sin(), neox)
    assert got_q.data_ptr() == q.data_ptr()  # in place
    torch.testing.assert_close(q.float(), want_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k.float(), want_k, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,size", [(1, 64), (11, 1500)])
def test_silu_and_mul(gen, dtype, tokens, size):
    from raylm.kernels.triton_layer_ops import silu_and_mul

    x = rand(gen, tokens, 2 * size, dtype=dtype, scale=3)
    got = silu_and_mul(x, out=poisoned(tokens, size, dtype=dtype))
    torch.testing.assert_close(got.float(), reference.silu_and_mul(x.float()), atol=TOL[dtype],
                               rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("held", ["all", "some"])
@pytest.mark.parametrize("tokens", [0, 1, 21])
def test_fused_moe(gen, poison_scratch, dtype, top_k, held, tokens):
    """Sorted, padded, grouped GEMMs equal the per-expert loop; with `some`, experts 1 and 4
    live on another EP rank and contribute nothing."""
    from raylm.kernels.triton_moe import fused_moe

    experts, hidden, inter = 6, 64, 48
    ours = list(range(experts)) if held == "all" else [0, 2, 3, 5]
    slot_of = torch.tensor([ours.index(e) if e in ours else len(ours) for e in range(experts)],
                           device=DEVICE)
    w13 = rand(gen, len(ours), 2 * inter, hidden, dtype=dtype, scale=0.2)
    w2 = rand(gen, len(ours), hidden, inter, dtype=dtype, scale=0.2)
    x = rand(gen, tokens, hidden, dtype=dtype)
    probs = torch.rand(tokens, experts, generator=gen).to(DEVICE).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    got = fused_moe(x, w13, w2, weights, ids, slot_of)
    want = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids, slot_of)
    tol = 4 * TOL[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
