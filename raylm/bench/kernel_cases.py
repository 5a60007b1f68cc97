"""The cases `raylm bench kernels` times: inputs at a model's dimensions, the least bytes
each op must move and the FLOPs it must do, and which implementation the engine runs here."""
from __future__ import annotations

from typing import List

import torch

from raylm.attention import AttentionMetadata, KVCachePool, PrefillSeq, create_attention_backend
from raylm.kernels import cpu_ops, reference
from raylm.kernels.triton_support import triton_runs_on

SHAPES = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, experts=8,
                         top_k=2, decode_batch=32, context=512, chunk=256),
    "llama-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336, experts=8,
                     top_k=2, decode_batch=64, context=2048, chunk=2048),
}


def build_cases(dims: dict, device: torch.device, dtype: torch.dtype, Case) -> List:
    """Every case at `dims`: the kernels the engine runs here (Triton on CUDA, C on CPU)
    against the torch references."""
    triton = device.type == "cuda" and triton_runs_on(device)
    fast, fast_name = None, None
    if triton:
        from raylm.kernels import triton_kv_store, triton_layer_ops

        fast, fast_name = triton_layer_ops, "triton"
    elif device.type == "cpu" and dtype in cpu_ops.DTYPES and cpu_ops.available():
        fast, fast_name = cpu_ops, "C"
    isz = torch.finfo(dtype).bits // 8
    h, d, hq, hkv, inter = (dims["hidden"], dims["head_dim"], dims["heads"], dims["kv_heads"],
                            dims["inter"])
    rand = (lambda *s: torch.randn(*s, device=device).to(dtype))
    cases = []
    for tokens, label in ((dims["decode_batch"], "decode"), (dims["chunk"], "prefill")):
        x, res, w = rand(tokens, h), rand(tokens, h), rand(h)
        cases.append(Case("add_rms_norm", f"{label} {tokens}x{h}", (4 * tokens * h + h) * isz,
                          5 * tokens * h,
                          lambda x=x, res=res, w=w: reference.rms_norm(x, w, 1e-6, res),
                          (lambda x=x, res=res, w=w: fast.rms_norm(x, w, 1e-6, res)) if fast
                          else None, fast_name))
        qkv = rand(tokens, (hq + 2 * hkv) * d)
        q, k = (qkv[:, :hq * d].view(tokens, hq, d),
                qkv[:, hq * d:(hq + hkv) * d].view(tokens, hkv, d))
        pos = torch.arange(tokens, device=device)
        angles = torch.rand(tokens, d // 2, device=device)
        cos, sin = angles.cos(), angles.sin()
        cases.append(Case("rotary", f"{label} {tokens}x({hq}+{hkv})x{d}",
                          2 * tokens * (hq + hkv) * d * isz + tokens * d * 4,
                          6 * tokens * (hq + hkv) * d,
                          lambda q=q, k=k, pos=pos: reference.rotary(pos, q, k, cos, sin),
                          (lambda q=q, k=k, pos=pos: fast.rotary(pos, q, k, cos, sin)) if fast
                          else None, fast_name))
        gate_up = rand(tokens, 2 * inter)
        cases.append(Case("silu_and_mul", f"{label} {tokens}x{inter}", 3 * tokens * inter * isz,
                          5 * tokens * inter, lambda g=gate_up: reference.silu_and_mul(g),
                          (lambda g=gate_up: fast.silu_and_mul(g)) if fast else None, fast_name))
        cases.append(_moe_case(dims, tokens, label, device, dtype, rand, triton, Case))
    if triton:
        cases.append(_store_case(dims, device, dtype, rand, Case, triton_kv_store))
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu_ops.gemv_available():
        cases.append(_gemv_case(dims, rand, Case))
    cases.append(_attention_case(dims, device, dtype, "decode", Case))
    cases.append(_attention_case(dims, device, dtype, "prefill", Case))
    return cases


def _moe_case(dims, tokens, label, device, dtype, rand, triton, Case):
    h, inter, experts, top_k = dims["hidden"], dims["inter"], dims["experts"], dims["top_k"]
    x = rand(tokens, h)
    w13, w2 = rand(experts, 2 * inter, h) * 0.05, rand(experts, h, inter) * 0.05
    weights, ids = torch.rand(tokens, experts, device=device).softmax(-1).topk(top_k, dim=-1)
    slot_of = torch.arange(experts, device=device)
    touched = len(set(ids.flatten().tolist()))
    isz = torch.finfo(dtype).bits // 8
    args = (x, w13, w2, weights, ids, slot_of)
    impl = None
    if triton:
        from raylm.kernels import triton_moe

        impl = (lambda: triton_moe.fused_moe(*args))
    return Case("fused_moe", f"{label} {tokens} tok, top{top_k}/{experts}x{h}x{inter}",
                3 * touched * h * inter * isz + 2 * tokens * h * isz,
                6 * tokens * top_k * h * inter, lambda: reference.fused_moe(*args), impl, "triton")


def _store_case(dims, device, dtype, rand, Case, triton_kv_store):
    tokens, hkv, d = dims["decode_batch"], dims["kv_heads"], dims["head_dim"]
    k_cache, v_cache = rand(tokens * 2, 16, hkv, d), rand(tokens * 2, 16, hkv, d)
    k, v = rand(tokens, hkv, d), rand(tokens, hkv, d)
    slots = torch.randperm(tokens * 32, device=device)[:tokens]
    isz = torch.finfo(dtype).bits // 8
    return Case("store_kv", f"decode {tokens}x{hkv}x{d}", 4 * tokens * hkv * d * isz, 0,
                lambda: reference.store_kv(k, v, k_cache, v_cache, slots),
                lambda: triton_kv_store.store_kv(k, v, k_cache, v_cache, slots), "triton")


def _attention_case(dims, device, dtype, kind, Case):
    """Decode: a batch at one context length. Prefill: one chunk over a cached prefix as
    long. The torch backend is the reference; the impl is what `auto` picks here."""
    hq, hkv, d, block = dims["heads"], dims["kv_heads"], dims["head_dim"], 16
    batch, ctx = (dims["decode_batch"],
                  dims["context"]) if kind == "decode" else (1, 2 * dims["chunk"])
    q_len = 1 if kind == "decode" else dims["chunk"]
    auto = create_attention_backend("auto", device, dtype).name
    calls = {name: _attention_call(name, device, dtype, batch, ctx, q_len, hq, hkv, d, block)
             for name in {"torch", auto}}
    isz = torch.finfo(dtype).bits // 8
    pairs = batch * (q_len * (ctx - q_len) + q_len * (q_len + 1) / 2)  # causal (query, key) pairs
    return Case("attention", f"{kind} {batch}x{q_len} tok, ctx {ctx}, {hq}/{hkv}x{d}",
                2 * batch * ctx * hkv * d * isz + 2 * batch * q_len * hq * d * isz,
                4 * pairs * hq * d, calls["torch"], calls[auto] if auto != "torch" else None, auto)


def _attention_call(name, device, dtype, batch, ctx, q_len, hq, hkv, d, block):
    backend = create_attention_backend(name, device, dtype)
    nb = -(-ctx // block)
    pool = KVCachePool(backend, 1, batch * nb, block, hkv, d, dtype)
    slots = torch.arange(batch * nb * block, device=device)
    k = torch.randn(slots.numel(), hkv, d, device=device).to(dtype)
    pool.store_kv(0, k, k.clone(), slots)
    table = torch.arange(batch * nb).view(batch, nb)
    q = torch.randn(batch * q_len, hq, d, device=device).to(dtype)
    if q_len == 1:
        meta = AttentionMetadata(torch.zeros(batch, dtype=torch.long), batch, table,
                                 torch.full((batch,), ctx))
    else:
        meta = AttentionMetadata(torch.zeros(q_len, dtype=torch.long),
                                 prefills=[PrefillSeq(0, q_len, ctx, table[0])])
    meta = backend.build_metadata(meta, block)
    kv = torch.randn(batch * q_len, hkv, d, device=device).to(dtype)
    return lambda: backend.forward(q, kv, kv, pool.layer(0), meta, d ** -0.5)


def _gemv_case(dims, rand, Case, layers: int = 30):
    """One decode row through `layers` distinct gate/up projections (so the weights come
    from memory, as in a forward): the C GEMV against oneDNN's prepacked GEMM (what runs
    otherwise). Bytes: the weights, read once."""
    n, k = 2 * dims["inter"], dims["hidden"]
    ws, x = [rand(n, k) for _ in range(layers)], rand(1, k)
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in ws]

    def onednn():
        for p in packed:
            torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    def gemv():
        for w in ws:
            cpu_ops.gemv(x, w)
    return Case("linear (gemv)", f"decode 1 x {k} -> {n}, {layers} layers", layers * n * k * 2,
                layers * 2 * n * k, onednn, gemv, "C")
