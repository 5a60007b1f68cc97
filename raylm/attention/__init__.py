"""Paged attention backends (a registry by name) and the KV-cache pool they lay out."""
from raylm.attention.base import (AttentionMetadata, BaseAttentionBackend, PrefillSeq,
                                  attention_backend_names, create_attention_backend,
                                  register_attention_backend, to_device)
from raylm.attention.kv_pool import KVCachePool
from raylm.attention import (cpu_backend, torch_backend,
                             triton_backend)  # noqa: F401  (register the built-ins)

__all__ = ["AttentionMetadata", "BaseAttentionBackend", "KVCachePool", "PrefillSeq",
           "attention_backend_names", "create_attention_backend", "register_attention_backend",
           "to_device"]
