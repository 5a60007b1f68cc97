"""HF `architectures` -> model class. One class serves each family; config switches cover
per-model differences (biases, q/k norms, tied embeddings, sparse layers)."""
from __future__ import annotations

import importlib
from typing import Dict, Tuple, Type

from torch import nn

_MODELS: Dict[str, Tuple[str, str]] = {
    "LlamaForCausalLM": ("raylm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("raylm.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("raylm.models.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("raylm.models.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("raylm.models.moe", "MoEForCausalLM"),
    "Qwen3MoeForCausalLM": ("raylm.models.moe", "MoEForCausalLM"),
}


def supported_architectures() -> list:
    return sorted(_MODELS)


def get_model_class(hf_config) -> Type[nn.Module]:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(f"model architectures {archs} are not supported; supported: "
                     f"{supported_architectures()}")


def is_moe(hf_config) -> bool:
    return get_model_class(hf_config).__name__ == "MoEForCausalLM"
