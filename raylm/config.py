"""Engine configuration (pydantic at the boundary) and the only place env vars are read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Literal, Optional, Tuple, Union

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

# ---- environment (read here only) -------------------------------------------------


def cache_dir() -> Path:
    """Where converted models live: $RAYLM_CACHE_DIR, else $XDG_CACHE_HOME/raylm, else
    ~/.cache/raylm."""
    if os.environ.get("RAYLM_CACHE_DIR"):
        return Path(os.environ["RAYLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "raylm"


def num_threads() -> Optional[int]:
    """Torch intra-op threads for a worker ($RAYLM_NUM_THREADS); None keeps torch's default."""
    value = os.environ.get("RAYLM_NUM_THREADS")
    return int(value) if value else None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def log_level() -> str:
    return os.environ.get("RAYLM_LOG_LEVEL", "INFO").upper()


def c_compiler() -> Optional[str]:
    """$CC for building the CPU attention kernel; None picks gcc/cc from PATH."""
    return os.environ.get("CC")


def triton_interpret() -> bool:
    """$TRITON_INTERPRET=1: Triton runs its kernels in its interpreter, on CPU tensors (tests).
    Triton reads it itself when a kernel is decorated; raylm only asks whether it is on."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_api_key() -> Optional[str]:
    """$RAYLM_API_KEY: the serving API key when none is given (`--api-key` wins)."""
    return os.environ.get("RAYLM_API_KEY") or None


def default_admin_api_key() -> Optional[str]:
    """$RAYLM_ADMIN_API_KEY: the admin routes' key when none is given (`--admin-api-key` wins)."""
    return os.environ.get("RAYLM_ADMIN_API_KEY") or None


def ray_address() -> Optional[str]:
    """$RAY_ADDRESS: the Ray cluster to join (Ray's own variable; `--address` wins)."""
    return os.environ.get("RAY_ADDRESS") or None


def gloo_socket_ifname() -> Optional[str]:
    """$GLOO_SOCKET_IFNAME: the interface gloo binds to, when the operator chose one."""
    return os.environ.get("GLOO_SOCKET_IFNAME")


def openai_api_key() -> Optional[str]:
    """$OPENAI_API_KEY: the benchmark client's key when none is given (the OpenAI client's)."""
    return os.environ.get("OPENAI_API_KEY") or None


# ---- configs ----------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "half": "float16"}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(_Config):
    """Which weights to run and how. `model` is a registered name or a local HF checkpoint dir."""

    model: str = Field("smollm2-135m-instruct",
                       description="embedded model name or a local HF checkpoint dir")
    tokenizer: Optional[str] = Field(None, description="tokenizer dir, when not the model's")
    dtype: str = Field(
        "auto",
        description="auto | float32 | bfloat16 | float16. auto: on CUDA the checkpoint's half "
                    "dtype; on CPU bf16 where the CPU has native bf16, else fp32 (logged; see "
                    "raylm.kernels.machine)")
    max_model_len: Optional[int] = Field(None, gt=0,
                                         description="prompt + output tokens (default: the "
                                                     "model's)")
    seed: int = 0
    cpu_gemm_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="CPU, bf16 weights: what GEMMs above a few rows (prefill, batched decode) "
                    "compute in; auto times both once per machine and keeps the faster (fp32 "
                    "holds a second, fp32 copy of each weight)")
    cpu_linear: Literal["onednn", "torch"] = Field(
        "onednn",
        description="CPU GEMMs: onednn prepacks weights after loading (faster at decode batch "
                    "sizes); torch keeps plain F.linear")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where the model runs: auto is CUDA when the process sees a GPU, else CPU")
    attention_backend: str = Field(
        "auto",
        description="paged attention (raylm.attention registry): auto picks per device; torch is "
                    "the reference; cpu decodes with the compiled C kernel; triton is the GPU "
                    "kernel (on CPU only under TRITON_INTERPRET=1)")  # checked in raylm.options
    fused_ops: Literal["auto", "triton", "cpu", "torch"] = Field(
        "auto",
        description="RMSNorm, rotary, SiLU-and-mul, MoE: auto runs the Triton kernels on CUDA and "
                    "the C kernels on CPU (when gcc is present); torch forces the references")
    enforce_eager: bool = Field(
        False, description="CUDA: never capture decode steps as CUDA graphs (vLLM's option)")

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
        if value != "auto" and value not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)} (got {value!r})")
        return value


class CacheConfig(_Config):
    """Paged KV cache. `kv_cache_memory`: bytes (int or '2GiB'), or a fraction (0, 1] of free
    memory."""

    block_size: int = Field(16, gt=0, description="tokens per KV block")
    kv_cache_memory: Union[float, int, str, None] = Field(
        None,
        description="CPU KV budget: bytes ('2GiB') or a fraction of available memory (default: "
                    "0.3 of it, at most 4 GiB, split over the DP replicas)")
    num_blocks: Optional[int] = Field(None, gt=0,
                                      description="fix the KV cache size in blocks (overrides "
                                                  "budgets)")
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1,
        description="CUDA: fraction of the GPU's memory for weights, activations and KV "
                    "cache (vLLM's option, same meaning)")
    kv_cache_dtype: str = Field(
        "auto",
        description="auto (the model dtype) | float32 (spares CPU attention's upcast, 2x memory) "
                    "| bfloat16 | float16")

    @field_validator("kv_cache_dtype")
    @classmethod
    def _check_kv_dtype(cls, value: str) -> str:
        value = DTYPE_ALIASES.get(value, value)
        if value != "auto" and value not in DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(DTYPES)} (got "
                             f"{value!r})")
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
    max_num_seqs: int = Field(128, gt=0, description="most sequences in one step")
    max_num_batched_tokens: int = Field(2048, gt=0, description="most tokens in one step")
    long_prefill_token_threshold: int = Field(
        512, gt=0,
        description="a longer prefill is chunked even when the step has room (decodes keep "
                    "flowing)")
    # Admission (AsyncEngine): past the bound a new request is refused (EngineOverloadedError
    # -> 429 + Retry-After) instead of queueing without bound. None: unbounded (the offline LLM
    # queues all its prompts at once).
    max_waiting_requests: Optional[int] = Field(
        None, gt=0, description="waiting sequences past which a new request is refused (429)")
    # Watchdog: the Ray executor stops waiting for its workers and fails the engine;
    # AsyncEngine marks itself dead and logs the stuck stack.
    step_timeout_s: float = Field(300.0, gt=0,
                                  description="a step running longer than this is stuck")
    # Streaming granularity (vLLM's --stream-interval): a request's update goes out at its
    # first token, at its end, and otherwise once this many new tokens have piled up. 1 sends
    # every token; more cuts the serving path's per-update work (frames, SSE chunks, writes).
    stream_interval: int = Field(
        1, gt=0, description="new tokens a request gathers before its next streamed update")


class ParallelConfig(_Config):
    tensor_parallel_size: int = Field(1, gt=0,
                                      validation_alias=AliasChoices("tensor_parallel_size", "tp"))
    pipeline_parallel_size: int = Field(1, gt=0,
                                        validation_alias=AliasChoices("pipeline_parallel_size",
                                                                      "pp"))
    # set by the serving layer (its replica count)
    data_parallel_size: int = Field(default=1, gt=0)
    distributed_executor_backend: Literal["uni", "ray", "sim"] = Field(
        "uni", validation_alias=AliasChoices("distributed_executor_backend", "executor"),
        description="uni: the model in this process; ray: on Ray worker actors (implied by tp*pp "
                    "> 1); sim: no model, each step sleeps for its roofline time "
                    "(raylm.executor.sim)")
    sim_device: str = Field("h100",
                            description="sim executor: the device, a preset (h100, h200, a100, "
                                        "l4) or name:GBps:TFLOPs:GiB[:step_ms[:layer_us]]")
    sim_model: Optional[str] = Field(None,
                                     description="sim executor: the simulated model's shape, a "
                                                 "preset (llama-3-8b, ...; default: --model's own "
                                                 "config)")
    pipeline_layer_split: Optional[List[int]] = Field(
        None, description="decoder layers per pipeline stage, e.g. 10 14 (default: even)")
    worker_num_cpus: float = Field(1.0, gt=0,
                                   description="CPUs per TP/PP Ray worker actor (its bundle)")
    cpu_communicator: Literal["shm", "gloo"] = Field(
        "shm",
        description="TP collectives on CPU: shm (shared memory when a group shares a host, else "
                    "gloo) or gloo")
    # With data_parallel_size > 1 (raylm serve) the EP group spans every replica's TP ranks
    # (rank = dp_rank * tp + tp_rank) and the replicas step in lockstep.
    enable_expert_parallel: bool = Field(
        False,
        description="MoE: whole experts spread over the EP ranks (the TP ranks; with raylm serve "
                    "--dp > 1, every replica's, in lockstep) instead of a slice of each")
    expert_placement: Optional[List[int]] = Field(
        None, description="EP rank of each expert, e.g. 0 1 1 0 (default: contiguous)")
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
                raise ValueError(f"expert_placement {placement} must use every EP rank "
                                 f"0..{ranks - 1} (tensor_parallel_size x data_parallel_size with "
                                 "expert parallelism) and no other")
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
            raise ValueError(f"kv_cache_memory: cannot parse {value!r} (use bytes like '2GiB' or "
                             "a fraction like 0.5)")
        value = amount if unit == "" and amount <= 1 else int(amount * _UNITS[unit])
    if isinstance(value, float) and value <= 1:
        if value <= 0:
            raise ValueError(f"kv_cache_memory: a fraction must be in (0, 1] (got {value})")
        return value
    if value <= 0:
        raise ValueError(f"kv_cache_memory: must be positive (got {value})")
    return int(value)
