"""The attention backend interface and its registry.

A backend owns three things, and nothing outside it depends on how it does them: the KV
cache layout of one layer (`kv_shape`), writing a step's new K/V into it (`store_kv`), and
attention over the paged cache (`forward`). `build_metadata` completes the step's common
metadata (built on the host by the input batch) with what the backend needs and moves it to
the device once. Backends register by name; `create_attention_backend("auto", device)`
picks the fastest one available for the device. The `torch` backend is the reference every
other backend is tested against.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar, List, Optional, Tuple

import torch

from raylm.registry import Registry


@dataclass
class PrefillSeq:
    q_start: int  # row of this request's first query token in the batch
    q_len: int
    ctx_len: int  # tokens attended to, new ones included
    block_ids: Optional[torch.Tensor]  # blocks holding the context (None: a dummy step, no cache)


@dataclass
class AttentionMetadata:
    """One step's attention inputs. The batch is ordered decodes-first: the first
    `num_decodes` tokens are one-token decodes, the rest are prefill chunks, one per request."""

    # [T] where each new token's K/V goes (block_id * block_size + offset)
    slot_mapping: torch.Tensor
    num_decodes: int = 0
    decode_block_table: Optional[torch.Tensor] = None  # [D, nb] padded block tables (int64)
    decode_lens: Optional[torch.Tensor] = None  # [D] context lengths, this step's token included
    decode_mask: Optional[torch.Tensor] = None  # [D, 1, L] bool, True = attend (torch backend)
    prefills: List[PrefillSeq] = field(default_factory=list)
    store_kv: bool = True  # False for a lockstep dummy forward: it owns no cache slot

    def to(self, device: torch.device) -> "AttentionMetadata":
        """A copy with every tensor on `device` (pinned host memory, non-blocking on CUDA)."""
        if device.type == "cpu":
            return self
        move = (lambda t: None if t is None else to_device(t, device))
        out = replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                               if isinstance(getattr(self, f.name), torch.Tensor)})
        out.prefills = [replace(p, block_ids=move(p.block_ids)) for p in self.prefills]
        return out


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> `device`: one pinned, non-blocking copy on CUDA; a no-op on CPU."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class BaseAttentionBackend(ABC):
    """Paged attention for one device. Subclasses set `name` and register themselves."""

    name: ClassVar[str]

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @classmethod
    def supports(cls, device: torch.device, kv_dtype: torch.dtype) -> bool:
        """Whether this backend can run here (`auto` takes the first registered one that can)."""
        return True

    @abstractmethod
    def kv_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int) -> Tuple[int, ...]:
        """Shape of one layer's cache (K and V together) in this backend's layout."""

    @abstractmethod
    def store_kv(self, cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """Write k, v [T, Hkv, Dh] into `cache` at flat slots [T] (block_id * block_size +
        offset)."""

    def build_metadata(self, meta: AttentionMetadata, block_size: int) -> AttentionMetadata:
        """Complete the host-built `meta` for this backend and move it to the device."""
        return meta.to(self.device)

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q [T, Hq, Dh], this step's k, v [T, Hkv, Dh] (already stored) -> [T, Hq, Dh] in fp32 or
        q's dtype. With `meta.store_kv` False (a dummy step: fresh prefills, no cache) it
        attends to k, v alone."""


_BACKENDS = Registry("attention_backend")
# "auto" tries these in order, per device type; the first whose supports() holds wins
# triton on CPU: only when asked
AUTO_ORDER = {"cpu": ["cpu", "torch"], "cuda": ["triton", "torch"]}


register_attention_backend = _BACKENDS.register


def attention_backend_names() -> List[str]:
    return ["auto", *_BACKENDS]


def create_attention_backend(name: str, device: torch.device,
                             kv_dtype: torch.dtype) -> BaseAttentionBackend:
    """The backend called `name` for `device`; "auto" picks per device (AUTO_ORDER)."""
    if name == "auto":
        order = [n for n in AUTO_ORDER.get(device.type, []) if n in _BACKENDS] + ["torch"]
        name = next(n for n in order if _BACKENDS[n].supports(device, kv_dtype))
    cls = _BACKENDS.lookup(name, attention_backend_names())
    if not cls.supports(device, kv_dtype):
        raise ValueError(f"attention_backend {name!r} cannot run on {device.type} with a "
                         f"{kv_dtype} KV cache")
    return cls(device)
