"""Engine configuration (pydantic at the boundary) and the only place env vars are read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---- environment (read here only) -------------------------------------------------


def cache_dir() -> Path:
    """Where converted models live: $RAYLM_CACHE_DIR, else $XDG_CACHE_HOME/raylm, else ~/.cache/raylm."""
    if os.environ.get("RAYLM_CACHE_DIR"):
        return Path(os.environ["RAYLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "raylm"


def num_threads() -> Optional[int]:
    """Torch intra-op threads for a worker ($RAYLM_NUM_THREADS); None keeps torch's default."""
    value = os.environ.get("RAYLM_NUM_THREADS")
    return int(value) if value else None


def log_level() -> str:
    return os.environ.get("RAYLM_LOG_LEVEL", "INFO").upper()


def c_compiler() -> Optional[str]:
    """$CC for building the CPU attention kernel; None picks gcc/cc from PATH."""
    return os.environ.get("CC")


def default_api_key() -> Optional[str]:
    """$RAYLM_API_KEY: the serving API key when none is given (`--api-key` wins)."""
    return os.environ.get("RAYLM_API_KEY") or None


def default_admin_api_key() -> Optional[str]:
    """$RAYLM_ADMIN_API_KEY: the admin routes' key when none is given (`--admin-api-key` wins)."""
    return os.environ.get("RAYLM_ADMIN_API_KEY") or None


def default_kv_cache_memory() -> Optional[str]:
    return os.environ.get("RAYLM_KV_CACHE_MEMORY")


# ---- configs ----------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Config):
    """Which weights to run and how. `model` is a registered name or a local HF checkpoint dir."""

    model: str = "smollm2-135m-instruct"
    tokenizer: Optional[str] = None
    dtype: str = "bfloat16"
    max_model_len: Optional[int] = Field(default=None, gt=0)
    seed: int = 0
    # CPU GEMMs: "onednn" prepacks weights after loading (faster at decode batch sizes);
    # "torch" keeps plain F.linear (and the unpacked weights).
    cpu_linear: Literal["onednn", "torch"] = "onednn"
    # Where the model runs: "auto" is CUDA when this process sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Paged attention (raylm.attention's registry): "auto" picks per device ("cpu": the
    # compiled C decode kernel when it builds; "torch": the device-generic reference).
    attention_backend: str = "auto"

    @field_validator("attention_backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        from raylm.attention import attention_backend_names

        if value not in attention_backend_names():
            raise ValueError(f"attention_backend must be one of {attention_backend_names()} (got {value!r})")
        return value

    def torch_device(self) -> torch.device:
        """The device this process runs the model on (resolves "auto" here, in the worker)."""
        if self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("device='cuda' but this process sees no CUDA GPU")
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        value = DTYPE_ALIASES.get(value, value)
        if value == "auto":
            return "bfloat16"
        if value not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} (got {value!r})")
        return value

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


class CacheConfig(_Config):
    """Paged KV cache. `kv_cache_memory`: bytes (int or '2GiB'), or a fraction (0, 1] of free memory."""

    block_size: int = Field(default=16, gt=0)
    kv_cache_memory: Union[float, int, str, None] = None
    num_blocks: Optional[int] = Field(default=None, gt=0)  # overrides kv_cache_memory (tests)
    enable_prefix_caching: bool = True
    # CUDA: the fraction of the GPU's memory this worker may fill (weights, activations and
    # KV cache; vLLM's option, same meaning). The CPU budget is kv_cache_memory.
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # "auto": the model dtype. float32 spares the per-step upcast in CPU attention at 2x memory.
    kv_cache_dtype: str = "auto"

    @field_validator("kv_cache_dtype")
    @classmethod
    def _check_kv_dtype(cls, value: str) -> str:
        value = DTYPE_ALIASES.get(value, value)
        if value != "auto" and value not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)} (got {value!r})")
        return value

    def torch_kv_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kv_cache_dtype == "auto" else DTYPES[self.kv_cache_dtype]

    @field_validator("kv_cache_memory")
    @classmethod
    def _check_memory(cls, value):
        if value is not None:
            parse_memory(value)  # raises a ValueError naming the field
        return value


class SchedulerConfig(_Config):
    max_num_seqs: int = Field(default=128, gt=0)
    max_num_batched_tokens: int = Field(default=2048, gt=0)
    # a prefill longer than this is chunked even when the budget has room, so decodes keep flowing
    long_prefill_token_threshold: int = Field(default=512, gt=0)
    # Admission (AsyncEngine): past this many waiting sequences a new request is refused
    # (EngineOverloadedError -> 429 + Retry-After) instead of queueing without bound.
    # None: unbounded (the offline LLM queues all its prompts at once).
    max_waiting_requests: Optional[int] = Field(default=None, gt=0)
    # Watchdog: a step running longer than this is stuck. The Ray executor stops waiting for
    # its workers and fails the engine; AsyncEngine marks itself dead and logs the stuck stack.
    step_timeout_s: float = Field(default=300.0, gt=0)


class ParallelConfig(_Config):
    tensor_parallel_size: int = Field(default=1, gt=0)
    pipeline_parallel_size: int = Field(default=1, gt=0)
    data_parallel_size: int = Field(default=1, gt=0)
    distributed_executor_backend: Literal["uni", "ray"] = "uni"  # world size > 1 implies "ray"
    # decoder layers per pipeline stage (e.g. [10, 14] for 24 layers); None splits evenly
    pipeline_layer_split: Optional[List[int]] = None
    worker_num_cpus: float = Field(default=1.0, gt=0)  # CPUs per Ray worker actor (its bundle)
    # TP collectives on CPU: "shm" (shared memory when a group's workers share a host,
    # else gloo) or "gloo" (always torch.distributed)
    cpu_communicator: Literal["shm", "gloo"] = "shm"
    # MoE expert parallelism: TP ranks hold whole experts (placement[e] = rank of expert e;
    # None = contiguous). With data_parallel_size > 1 (raylm serve) the EP group spans every
    # replica's TP ranks (rank = dp_rank * tp + tp_rank) and the replicas step in lockstep.
    enable_expert_parallel: bool = False
    expert_placement: Optional[List[int]] = None
    # Set at run time by the serving layer, from the DP coordinator's group membership:
    data_parallel_rank: int = Field(default=0, ge=0)
    data_parallel_store: Optional[Tuple[str, int]] = None  # the coordinator's TCP store
    data_parallel_group: str = ""  # store key prefix of this generation of the group

    @model_validator(mode="after")
    def _check_expert_placement(self) -> "ParallelConfig":
        placement = self.expert_placement
        if placement is not None:
            ranks = self.tensor_parallel_size * (self.data_parallel_size if self.expert_dp else 1)
            if not self.enable_expert_parallel:
                raise ValueError("expert_placement needs enable_expert_parallel=True")
            if sorted(set(placement)) != list(range(ranks)):
                raise ValueError(f"expert_placement {placement} must use every EP rank 0..{ranks - 1} "
                                 "(tensor_parallel_size x data_parallel_size with expert parallelism) and no other")
        return self

    @property
    def expert_dp(self) -> bool:
        """Expert parallelism across DP replicas: the replicas must step in lockstep."""
        return self.enable_expert_parallel and self.data_parallel_size > 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class EngineConfig(_Config):
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_memory(value: Union[float, int, str]) -> Union[float, int]:
    """'2GiB' or 2147483648 -> bytes (int); 0.3 -> a fraction of free memory (float in (0, 1])."""
    if isinstance(value, str):
        text = value.strip().lower()
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz ")
        unit = text[len(number):].strip()
        try:
            amount = float(number)
        except ValueError:
            amount = None
        if amount is None or unit not in _UNITS:
            raise ValueError(f"kv_cache_memory: cannot parse {value!r} (use bytes like '2GiB' or a fraction like 0.5)")
        value = amount if unit == "" and amount <= 1 else int(amount * _UNITS[unit])
    if isinstance(value, float) and value <= 1:
        if value <= 0:
            raise ValueError(f"kv_cache_memory: a fraction must be in (0, 1] (got {value})")
        return value
    if value <= 0:
        raise ValueError(f"kv_cache_memory: must be positive (got {value})")
    return int(value)
