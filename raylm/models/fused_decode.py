"""The CPU decode fast path for dense Llama-family stacks: a decode step of a few rows runs
all of a stage's layers in one C call (raylm.kernels.cpu_decode_stack) instead of ~10 ops
per layer from Python; a bigger decode batch runs oneDNN's GEMMs and three C calls per
layer. Same kernels, order and roundings as the per-op path with fused_ops="cpu", so the
outputs are equal; it only removes dispatch (~4-6 ms of a ~14 ms SmolLM2 step at batch 1,
~3 ms of ~45 at batch 32).

It applies where the per-op path would run the C kernels on every op: bf16 weights kept
plain for the GEMV and prepacked for oneDNN, the cpu attention backend, tensor parallel
size 1, no q/k norms, a dense MLP; per step, a pure decode batch that stores K/V."""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

import torch

from raylm.attention import AttentionMetadata
from raylm.kernels import cpu_decode_stack as kernel
from raylm.kernels import cpu_ops, ops
from raylm.models.layers import packed_linear

logger = logging.getLogger(__name__)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


class FusedDecodeStack:
    """Callable as the stage's layers on eligible steps: (positions, x, residual, meta) ->
    (x, residual). Holds pointers into the layers' weights and caches: rebuild it whenever
    the KV cache is reallocated (the model runner does, after binding)."""

    def __init__(self, layers: List[torch.nn.Module]) -> None:
        self.layers = layers
        self.array = kernel.layer_array([self._describe(layer) for layer in layers])
        self.dims = self._dims(layers[0])

    @staticmethod
    def _describe(layer) -> kernel.DecodeLayer:
        a, mlp = layer.self_attn, layer.mlp
        return kernel.DecodeLayer(
            ln1=_ptr(layer.input_layernorm.weight),
            ln2=_ptr(layer.post_attention_layernorm.weight), w_qkv=_ptr(a.qkv_proj.plain),
            b_qkv=_ptr(a.qkv_proj.bias), w_o=_ptr(a.o_proj.plain),
            w_gate_up=_ptr(mlp.gate_up_proj.plain), w_down=_ptr(mlp.down_proj.plain),
            cache=_ptr(a.attn.pool.layer(a.attn.layer_id)))

    @staticmethod
    def _dims(layer) -> kernel.DecodeDims:
        a = layer.self_attn
        cache = a.attn.pool.layer(a.attn.layer_id)
        return kernel.DecodeDims(
            hidden=layer.input_layernorm.weight.shape[0], hq=a.num_heads, hkv=a.num_kv_heads,
            head_dim=a.head_dim, inter=layer.mlp.down_proj.plain.shape[1],
            num_blocks=cache.shape[2], block_size=cache.shape[3], eps=layer.input_layernorm.eps,
            scale=a.attn.scale, cos=_ptr(a.rotary.cos), sin=_ptr(a.rotary.sin),
            neox=int(a.rotary.neox))

    def applies(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        return (ops.mode() == "cpu" and x.dtype == torch.bfloat16 and not meta.prefills
                and meta.store_kv and 0 < x.shape[0] == meta.num_decodes)

    def __call__(self, positions: torch.Tensor, x: torch.Tensor, residual: Optional[torch.Tensor],
                 meta: AttentionMetadata) -> Tuple[torch.Tensor, torch.Tensor]:
        index = [t.contiguous() for t in (positions, meta.slot_mapping, meta.decode_block_table,
                                          meta.decode_lens)]
        if x.shape[0] <= cpu_ops.GEMV_MAX_ROWS:
            return kernel.decode_stack(self.array, self.dims, x.contiguous(), residual, *index)
        return self._batched(x, residual, index)

    def _batched(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                 index: List[torch.Tensor]):
        """Bigger decode batches: oneDNN's GEMMs from here, the rest in three C calls a layer
        (add + RMSNorm twice; rotary + KV store + attention + bf16 rounding; SiLU-and-mul),
        the per-op path's kernels in its order, without its module and tensor glue."""
        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            if residual is None:
                residual, h = x, cpu_ops.rms_norm(x, ln1.weight, ln1.eps)
            else:
                h, residual = cpu_ops.rms_norm(x, ln1.weight, ln1.eps, residual)
            qkv = packed_linear(h, a.qkv_proj.packed, a.qkv_proj.bias)
            attn = kernel.decode_attention(self.array, i, self.dims, qkv, *index)
            h, residual = cpu_ops.rms_norm(packed_linear(attn, a.o_proj.packed), ln2.weight,
                                           ln2.eps, residual)
            gate_up = packed_linear(h, mlp.gate_up_proj.packed)
            x = packed_linear(cpu_ops.silu_and_mul(gate_up), mlp.down_proj.packed)
        return x, residual


def why_not(layers: List[torch.nn.Module], tp_size: int) -> Optional[str]:
    """Why these layers cannot take the fast path, or None when they can."""
    from raylm.models.llama import DecoderLayer, LlamaMLP

    if not (kernel.available() and cpu_ops.gemv_available()):
        return "the C kernels or AVX512-BF16 are missing"
    if tp_size != 1:
        return "tensor parallel"
    if not layers or any(not isinstance(l, DecoderLayer) or not isinstance(l.mlp, LlamaMLP)
                         for l in layers):
        return "not a dense Llama-family stack"
    first = layers[0].self_attn
    for layer in layers:
        a, mlp = layer.self_attn, layer.mlp
        linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if any(lin.plain is None or lin.packed is None
               for lin in linears) or a.o_proj.bias is not None:
            return "weights not bf16 with plain GEMV copies"
        if a.qk_norm or a.attn.pool is None or a.attn.pool.backend.name != "cpu":
            return "q/k norms or not the cpu attention backend"
        if (a.attn.pool.layer(a.attn.layer_id).dtype != torch.bfloat16 or a.rotary.neox
                != first.rotary.neox):
            return "KV cache not bf16"
    return None


def build_fused_decode(model, tp_size: int) -> Optional[FusedDecodeStack]:
    """The fast path for `model`'s stage, or None (logged) when it does not apply."""
    layers = list(model.layers[model.start:model.end]) if hasattr(model, "layers") else []
    reason = why_not(layers, tp_size)
    if reason is not None:
        logger.info("CPU fused decode stack off: %s", reason)
        return None
    logger.info("CPU fused decode stack on for %d layers (decode steps of <= %d rows)",
                len(layers), cpu_ops.GEMV_MAX_ROWS)
    return FusedDecodeStack(layers)
