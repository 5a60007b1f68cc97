"""Resolve a model name or path to a local HF dir, build the model class, load safetensors."""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch
from safetensors import safe_open

from raylm.models.embedded import embedded_name, ensure_embedded, weight_bytes
from raylm.models.registry import get_model_class

logger = logging.getLogger(__name__)


def resolve_model_path(model: str) -> str:
    """An embedded model name, or a local dir holding config.json and *.safetensors."""
    name = embedded_name(model)
    if name is not None:
        return str(ensure_embedded(name))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {model!r} is neither an embedded model (smollm2-135m-instruct) "
                         "nor a local directory; nothing is downloaded from a hub")
    if not (path / "config.json").exists():
        raise ValueError(f"model {model!r}: no config.json in {path}")
    if not glob.glob(str(path / "*.safetensors")):
        raise ValueError(f"model {model!r}: no *.safetensors files in {path}")
    return str(path)


def checkpoint_bytes(model: str) -> Optional[int]:
    """Bytes of a model's weights on disk, read from file sizes (nothing converted or loaded);
    None when `model` names nothing local."""
    try:
        name = embedded_name(model)
        if name is not None:
            return weight_bytes(name)
        return sum(f.stat().st_size
                   for f in Path(model).expanduser().glob("*.safetensors")) or None
    except (OSError, ValueError):
        return None


def load_hf_config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def checkpoint_dtype(hf_config) -> Optional[torch.dtype]:
    """The dtype the checkpoint says its weights are in (HF's `dtype`), if it says."""
    dtype = getattr(hf_config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class CheckpointTensor:
    """A checkpoint tensor not read yet. Weight loaders take the part they need: `narrow`
    and indexing read only that slice from disk (a TP rank reads its shard, not the whole
    matrix); `full()` reads everything. Valid while its file is open (during iteration)."""

    def __init__(self, handle, name: str) -> None:
        self._handle, self._name = handle, name
        self.shape = torch.Size(handle.get_slice(name).get_shape())

    def full(self) -> torch.Tensor:
        return self._handle.get_tensor(self._name)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._handle.get_slice(self._name)[index]

    def __getitem__(self, index) -> torch.Tensor:
        return self._handle.get_slice(self._name)[index]


def materialize(t) -> torch.Tensor:
    """The whole tensor, whether `t` is a CheckpointTensor or already a tensor."""
    return t.full() if isinstance(t, CheckpointTensor) else t


def iter_safetensors(path: str, keep=None) -> Iterator[Tuple[str, CheckpointTensor]]:
    """(name, CheckpointTensor) for every checkpoint tensor that `keep(name)` accepts (all
    without `keep`); the others are never read (a pipeline stage skips other stages')."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, CheckpointTensor(f, name)


def load_model(path: str, hf_config, dtype: torch.dtype, device=None) -> torch.nn.Module:
    """Build the registered class for `hf_config` in `dtype` on `device` (default CPU) and
    fill it from the checkpoint (each tensor read on the host, copied once to the device).
    Every parameter must be loaded; a missing one is an error, not random weights."""
    cls = get_model_class(hf_config)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(old)
    loaded = model.load_weights(iter_safetensors(path, keep=getattr(model, "wants_weight", None)))
    missing = sorted(set(n for n, _ in model.named_parameters()) - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}")
    return model.eval()
