"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): attention bias and per-head q/k
norms are config switches. The MoE family reuses everything here but the MLP."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import nn

from raylm.models.attention import AttentionMetadata, PagedAttention
from raylm.models.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm, RowParallelLinear,
                                 SiluAndMul, VocabParallelEmbedding, build_rotary,
                                 default_weight_loader)
from raylm.distributed.parallel_state import get_pp_group, get_tp_group

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


class LlamaAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        tp = get_tp_group().size
        self.head_dim = (getattr(config, "head_dim", None) or config.hidden_size
                         // config.num_attention_heads)
        total_kv = config.num_key_value_heads
        if config.num_attention_heads % tp or total_kv % tp:
            raise ValueError(f"tensor_parallel_size {tp} must divide num_attention_heads "
                             f"({config.num_attention_heads}) and num_key_value_heads "
                             f"({total_kv})")
        self.num_heads, self.num_kv_heads = config.num_attention_heads // tp, total_kv // tp
        d = self.head_dim
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [config.num_attention_heads * d, total_kv * d, total_kv * d],
            bias=bias)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size)
        self.qk_norm = config.model_type in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm, self.k_norm = (RMSNorm(d, config.rms_norm_eps),
                                        RMSNorm(d, config.rms_norm_eps))
        self.rotary = build_rotary(config, d, config.max_position_embeddings)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d, d ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden_size,
                                                 [intermediate_size, intermediate_size])
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


def dense_mlp(config, layer_idx: int) -> nn.Module:
    return LlamaMLP(config.hidden_size, config.intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, make_mlp: Callable) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = make_mlp(config, layer_idx)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Checkpoint names map onto merged parameters through `stacked_params`."""

    make_mlp = staticmethod(dense_mlp)
    fused_decode = None  # CPU: set by the model runner (raylm.models.fused_decode)
    # (our param, checkpoint name, shard id)
    stacked_params = [("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1),
                      ("qkv_proj", "v_proj", 2), ("gate_up_proj", "gate_proj", 0),
                      ("gate_up_proj", "up_proj", 1)]

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.pp = get_pp_group()
        self.start, self.end = self.pp.layer_range(config.num_hidden_layers)
        # A pipeline stage builds only its own layers (others stay placeholders, so layer
        # indices and checkpoint names line up), the first stage the embedding, the last
        # the final norm and LM head.
        first, last = self.pp.is_first, self.pp.is_last
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size,
                                                   config.hidden_size) if first else None
        self.layers = nn.ModuleList(DecoderLayer(config, i, self.make_mlp)
                                    if self.start <= i < self.end else nn.Identity()
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if last else None
        self.tie = getattr(config, "tie_word_embeddings", False)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size) if last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """Final hidden states on the last stage; (hidden, residual) for the next stage on
        the others. Stages after the first take the previous stage's pair as `intermediate`."""
        x, residual = (self.embed_tokens(input_ids),
                       None) if intermediate is None else intermediate
        if self.fused_decode is not None and self.fused_decode.applies(x, meta):
            x, residual = self.fused_decode(positions, x, residual, meta)
        else:
            for layer in self.layers[self.start:self.end]:
                x, residual = layer(positions, x, residual, meta)
        if not self.pp.is_last:
            return x, residual
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> set:
        """Copy checkpoint tensors into parameters; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            target = self.map_weight_name(name)
            if target is None:
                continue
            param_name, shard_id = target
            if param_name not in params:
                continue
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard_id)  # the loader reads its slice; copy_ casts the dtype
            loaded.add(param_name)
        if self.tie and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight
            loaded.add("lm_head.weight")
        return loaded

    def wants_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs on this pipeline stage (others are not
        read)."""
        m = _LAYER_RE.match(name.removeprefix("model."))
        if m is not None:
            return self.start <= int(m.group(1)) < self.end
        return self.map_weight_name(name) is not None

    def map_weight_name(self, name: str) -> Optional[Tuple[str, Optional[int]]]:
        name = name.removeprefix("model.")
        if "rotary_emb.inv_freq" in name or (self.tie and name.startswith("lm_head")):
            return None
        if name.startswith("embed_tokens") and self.embed_tokens is None:
            # a tied LM head on a later stage loads the embedding matrix as its own weight
            return ("lm_head.weight", None) if self.tie and self.lm_head is not None else None
        if (name.startswith("norm.") and self.norm is None) or (name.startswith("lm_head")
                                                                and self.lm_head is None):
            return None
        for param, ckpt, shard in self.stacked_params:
            if f".{ckpt}." in name:
                return name.replace(ckpt, param), shard
        return name, None
