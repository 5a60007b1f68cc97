"""Mixture-of-experts decoders (Mixtral, Qwen3-MoE): the Llama decoder with a sparse MLP.

Experts are stored fused in memory (w13: [E, 2I, H], w2: [E, H, I]); checkpoints keep
them per expert on disk, and `load_weights` maps each file tensor to its expert slot.
The TP split is along the intermediate dim, like a dense MLP; with expert parallelism
(`enable_expert_parallel`) each TP rank instead holds whole experts, per a placement table.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from raylm.models.layers import _param
from raylm.models.llama import LlamaForCausalLM, dense_mlp
from raylm.distributed.parallel_state import get_ep_group, get_tp_group
from raylm.kernels import ops

# checkpoint expert-weight names -> (w13 half or w2). Mixtral: w1 gate, w3 up, w2 down.
_EXPERT_NAMES = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None),
                 "gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
_EXPERT_RE = re.compile(
    r"^(layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int,
                 renormalize: bool) -> None:
        super().__init__()
        self.tp, ep = get_tp_group(), get_ep_group()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        if ep.size > 1:  # whole experts, some of them
            self.experts, self.local_i, self.shard = ep.local_experts(num_experts), intermediate, 0
        else:  # a 1/tp slice of every expert
            if intermediate % self.tp.size:
                raise ValueError(f"moe intermediate size {intermediate} is not divisible by tp "
                                 f"{self.tp.size}")
            self.experts, self.local_i, self.shard = (list(range(num_experts)),
                                                      intermediate // self.tp.size, self.tp.rank)
        self.slot = {e: i for i, e in enumerate(self.experts)}  # global expert id -> row in w13/w2
        self._slot_of: Optional[torch.Tensor] = None  # the same as a device tensor (see _slots)
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.w13 = _param(len(self.experts), 2 * self.local_i, hidden)
        self.w2 = _param(len(self.experts), hidden, self.local_i)

    def load_expert(self, which: str, expert: int, half: Optional[int],
                    loaded: torch.Tensor) -> None:
        if expert not in self.slot:
            return  # another EP rank's expert
        i, size, start = self.slot[expert], self.local_i, self.shard * self.local_i
        if which == "w13":
            self.w13.data[i, half * size:(half + 1) * size].copy_(loaded.narrow(0, start, size))
        else:
            self.w2.data[i].copy_(loaded.narrow(1, start, size))

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x).float(), dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights, experts

    def assign_experts(self, experts) -> None:
        """Hold `experts` (whole, EP) from now on: fresh, unloaded storage for them (a re-formed
        EP group moves experts; the caller reloads their weights)."""
        dtype, hidden, device = self.w13.dtype, self.w13.shape[2], self.w13.device
        self.experts = list(experts)
        self.slot = {e: i for i, e in enumerate(self.experts)}
        n = len(self.experts)
        self.w13 = nn.Parameter(torch.empty(n, 2 * self.local_i, hidden, dtype=dtype,
                                            device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n, hidden, self.local_i, dtype=dtype, device=device),
                               requires_grad=False)
        self._slot_of = None  # rebuilt for the new experts at the next forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ep = get_ep_group()
        if ep.dp is None:
            return self.tp.all_reduce(self._experts_out(x).to(x.dtype))
        out = ep.combine(self._experts_out(ep.dispatch(x)).to(x.dtype))  # every replica's tokens
        return self.tp.all_reduce(out)

    def _slots(self, device: torch.device) -> torch.Tensor:
        """[num_experts] -> this rank's slot of each expert, or n (past the last) if not ours."""
        if self._slot_of is None or self._slot_of.device != device:
            n = len(self.experts)
            table = [self.slot.get(e, n) for e in range(self.num_experts)]
            self._slot_of = torch.tensor(table, dtype=torch.long, device=device)
        return self._slot_of

    def _experts_out(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 sum over this rank's experts of weight * expert(x), per token (pairs routed
        to another EP rank's experts contribute nothing here)."""
        weights, experts = self.route(x)
        return ops.fused_moe(x, self.w13, self.w2, weights, experts, self._slots(x.device))


def _moe_mlp(config, layer_idx: int) -> nn.Module:
    if config.model_type == "mixtral":
        return FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                        config.intermediate_size, renormalize=True)
    sparse = (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
              and (layer_idx + 1) % getattr(config, "decoder_sparse_step", 1) == 0)
    if not sparse:
        return dense_mlp(config, layer_idx)
    return FusedMoE(config.num_experts, config.num_experts_per_tok, config.hidden_size,
                    config.moe_intermediate_size,
                    renormalize=getattr(config, "norm_topk_prob", False))


class MoEForCausalLM(LlamaForCausalLM):
    make_mlp = staticmethod(_moe_mlp)

    def map_weight_name(self, name: str):
        name = name.replace("block_sparse_moe.gate.", "mlp.gate.")
        return super().map_weight_name(name)

    def wants_weight(self, name: str) -> bool:
        """Besides other stages' layers, skip other EP ranks' experts unread."""
        if not super().wants_weight(name):
            return False
        m = _EXPERT_RE.match(name.removeprefix("model."))
        return m is None or int(m.group(2)) in self.get_submodule(f"{m.group(1)}.mlp").slot

    def load_weights(self, weights):
        experts_loaded = set()

        def dense_only():
            for name, tensor in weights:
                m = _EXPERT_RE.match(name.removeprefix("model."))
                if m is None:
                    yield name, tensor
                    continue
                layer, expert, kind = m.group(1), int(m.group(2)), m.group(3)
                which, half = _EXPERT_NAMES[kind]
                moe = self.get_submodule(f"{layer}.mlp")
                moe.load_expert(which, expert, half, tensor)
                experts_loaded.add(f"{layer}.mlp.{which}")

        return super().load_weights(dense_only()) | experts_loaded

    def reload_experts(self, path: str) -> None:
        """After the EP group changed: take this rank's new experts and read only theirs."""
        from raylm.models.loader import iter_safetensors

        moes = [m for m in self.modules() if isinstance(m, FusedMoE)]
        for m in moes:
            m.assign_experts(get_ep_group().local_experts(m.num_experts))

        def expert_weight(name: str) -> bool:
            return (_EXPERT_RE.match(name.removeprefix("model.")) is not None
                    and self.wants_weight(name))

        loaded = self.load_weights(iter_safetensors(path, keep=expert_weight))
        if len(loaded) != 2 * len(moes):
            raise ValueError(f"checkpoint {path}: expert weights missing after re-placement "
                             f"({sorted(loaded)})")
