"""Shared, TP-aware building blocks. Each parameter carries a `weight_loader(param, loaded,
shard_id)` that copies this rank's slice of a checkpoint tensor into it (reading only that
slice when `loaded` is a not-yet-read loader.CheckpointTensor)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raylm.distributed.parallel_state import get_tp_group
from raylm.kernels import cpu_ops, hugepages, ops


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    """Copy a whole checkpoint tensor (a CheckpointTensor or a tensor; copy_ casts the dtype)."""
    from raylm.models.loader import materialize

    assert (param.shape == loaded.shape), (f"shape mismatch {tuple(param.shape)} vs "
                                           f"{tuple(loaded.shape)}")
    param.data.copy_(materialize(loaded))


def _param(*shape: int, loader=default_weight_loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


class RMSNorm(nn.Module):
    """RMSNorm (fp32 accumulation, like HF's); with `residual`, adds it first and returns
    (normed, new_residual): one fused kernel on the Triton and C paths."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(size)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return ops.rms_norm(x, self.weight, self.eps, residual)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def keeps_gemv_weight(weight: torch.Tensor) -> bool:
    """A bf16 CPU weight keeps its plain copy for the C GEMV (decode rows; AVX512-BF16 only)."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and cpu_ops.gemv_available())


class PackableLinear(nn.Module):
    """A linear whose CPU weight can be prepacked for oneDNN after loading. Why: at decode
    batch sizes (M = 1..128) the prepacked GEMM is 1.2-2.7x faster than F.linear on this CPU
    (bf16 and fp32, measured), and it is what inductor's weight freezing uses. A bf16 weight
    also keeps its plain copy for a few rows (single-stream decode): with the weights coming
    from memory the C GEMV is ~1.6x oneDNN at 1-2 rows (oneDNN's per-call cost dominates),
    at the price of holding the weights twice."""

    packed: Optional[torch.Tensor] = None  # oneDNN's layout, in the GEMM dtype
    plain: Optional[torch.Tensor] = None  # for the C GEMV (x with <= GEMV_MAX_ROWS rows)

    def prepack(self, batch_hint: int = 32, gemm_dtype: Optional[torch.dtype] = None) -> None:
        """`gemm_dtype` (default: the weight's) is what the packed GEMM computes in: fp32 for
        bf16 weights where this CPU's fp32 GEMMs are faster (raylm.kernels.machine)."""
        self.packed = pack_weight(self.weight, batch_hint, gemm_dtype)
        if keeps_gemv_weight(self.weight):
            self.plain = self.weight.detach()
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)  # the packed copy replaces it

    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (self.plain is not None and x.shape[0] <= cpu_ops.GEMV_MAX_ROWS and x.dtype
                == torch.bfloat16):
            return cpu_ops.gemv(x, self.plain, bias)
        if self.packed is not None:
            return packed_linear(x, self.packed, bias)
        return F.linear(x, self.weight, bias)


def pack_weight(weight: torch.Tensor, batch_hint: int,
                gemm_dtype: Optional[torch.dtype]) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(gemm_dtype or weight.dtype),
                                                   batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ W^T (+ bias) through a oneDNN-packed W; computed in W's dtype, returned in x's."""
    if packed.dtype == x.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    bias = None if bias is None else bias.to(packed.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [],
                                              "").to(x.dtype)


def prepack_linears(model: nn.Module, batch_hint: int = 32,
                    gemm_dtype: Optional[torch.dtype] = None) -> int:
    """Prepack every PackableLinear for oneDNN (CPU only), computing in `gemm_dtype` (default:
    each weight's); returns how many were packed."""
    if not onednn_available():
        return 0
    layers = [m for m in model.modules() if isinstance(m, (PackableLinear, ParallelLMHead))
              and m.weight.device.type == "cpu"]
    for m in layers:
        m.prepack(batch_hint, gemm_dtype)
    _to_huge_pages(layers)
    return len(layers)


def _to_huge_pages(layers: Sequence[nn.Module]) -> None:
    """Move what a decode step streams through the C GEMV (the plain weights, and the LM
    head's, which a tied embedding shares) onto huge pages (raylm.kernels.hugepages)."""
    plain = [m for m in layers if getattr(m, "plain", None) is not None]
    for m, moved in zip(plain, hugepages.pack([m.plain for m in plain])):
        m.plain = moved
    for m in layers:
        if isinstance(m, ParallelLMHead) and keeps_gemv_weight(m.weight):
            m.weight.data = hugepages.pack([m.weight.data])[0]


class ColumnParallelLinear(PackableLinear):
    """y = x W^T with W's output rows split across TP ranks. `output_sizes` lists the logical
    matrices merged into W (q/k/v, gate/up); shard_id picks one of them when loading."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_group()
        for size in output_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} is not divisible by tensor_parallel_size "
                                 f"{tp.size}")
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.local_sizes = [s // tp.size for s in output_sizes]
        self.offsets = [sum(self.local_sizes[:i]) for i in range(len(output_sizes))]
        out = sum(self.local_sizes)
        self.weight = _param(out, input_size, loader=self._load)
        self.bias = _param(out, loader=self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor,
              shard_id: Optional[int] = None) -> None:
        i = shard_id or 0
        size = self.local_sizes[i]
        piece = loaded.narrow(0, self.tp_rank * size, size)
        param.data.narrow(0, self.offsets[i], size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)


class RowParallelLinear(PackableLinear):
    """y = x W^T with W's input columns split across TP ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_group()
        if input_size % tp.size:
            raise ValueError(f"input size {input_size} is not divisible by tensor_parallel_size "
                             f"{tp.size}")
        self.tp = tp
        self.local_in = input_size // tp.size
        self.weight = _param(output_size, self.local_in, loader=self._load)
        self.bias = _param(output_size) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.local_in, self.local_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.linear(x))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across TP ranks; out-of-shard ids contribute zeros, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = get_tp_group()
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // self.tp.size)
        self.start = self.tp.rank * self.shard
        self.weight = _param(self.shard, hidden_size, loader=self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        piece = loaded[self.start:self.start + self.shard]
        param.data.zero_()
        param.data[:piece.shape[0]].copy_(piece)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1),
                          self.weight) * mask.unsqueeze(-1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection; logits are gathered to the full vocab on every rank.
    Prepacking keeps its own copy: a tied weight still serves the embedding."""

    packed: Optional[torch.Tensor] = None

    def prepack(self, batch_hint: int = 32, gemm_dtype: Optional[torch.dtype] = None) -> None:
        self.packed = pack_weight(self.weight, batch_hint, gemm_dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if (self.packed is not None and hidden.shape[0] <= cpu_ops.GEMV_MAX_ROWS
                and keeps_gemv_weight(hidden)):
            logits = cpu_ops.gemv(hidden, self.weight)
        elif self.packed is not None:
            logits = packed_linear(hidden, self.packed)
        else:
            logits = F.linear(hidden, self.weight)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        return logits[..., :self.vocab_size]


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding; `neox` pairs dims (i, i + D/2) (HF's rotate_half), else
    (2i, 2i + 1). The cos/sin tables are fp32 [max_position, D/2]; the reference applies them
    in the activation dtype, as HF does; the Triton kernel rotates q and k in place."""

    def __init__(self, head_dim: int, inv_freq: torch.Tensor, max_position: int,
                 scaling: float = 1.0, neox: bool = True) -> None:
        super().__init__()
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float())
        self.register_buffer("cos", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin", freqs.sin() * scaling, persistent=False)
        self.neox = neox

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq, D], k: [T, Hk, D] -> rotated, same dtype."""
        return ops.rotary(positions, q, k, self.cos, self.sin, self.neox)


def build_rotary(config, head_dim: int, max_position: int) -> RotaryEmbedding:
    """Rotary from an HF config, reusing transformers' rope-type table (llama3, yarn, linear,
    ...)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        return RotaryEmbedding(head_dim, inv_freq, max_position)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return RotaryEmbedding(head_dim, inv_freq, max_position, float(scaling))
