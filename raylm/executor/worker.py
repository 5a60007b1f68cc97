"""A worker drives one model runner on one device. Executors call it directly (uniproc) or
as a Ray actor (the Ray executor); every method is reachable by `collective_rpc` name."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from raylm.config import EngineConfig, num_threads
from raylm.executor.sched_output import ModelRunnerOutput, SchedulerOutput
from raylm.distributed.communicator import free_port, init_world
from raylm.executor.model_runner import ModelRunner
from raylm.distributed.parallel_state import init_expert_dp, init_parallel_groups


class Worker:
    """Global rank `rank` of the replica's pp x tp grid (rank = pp_rank * tp + tp_rank)."""

    def __init__(self, config: EngineConfig, model_path: str, rank: int = 0) -> None:
        self.config = config
        self.model_path = model_path
        self.rank = rank
        self.runner: ModelRunner = None

    def rendezvous_address(self) -> Tuple[str, int]:
        """Where the group's store listens: this node's IP and a port free on it (rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def init_device(self, rendezvous: Optional[Tuple[str, int]] = None) -> None:
        """Threads, seed, and (world > 1) the process group and this rank's TP/PP groups; all
        ranks must call it at once: joining the group blocks until everyone has."""
        threads = num_threads()
        if threads:
            torch.set_num_threads(threads)
        device = self.config.model.torch_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            # CPU only: subnormal floats take microcode assists on x86, and flushing them to
            # zero measured ~10% more decode throughput here (SmolLM2, fp32 and bf16). The
            # setting belongs to this thread (the one that steps the engine in Serve replicas
            # and Ray workers), so code on it also reads a subnormal JSON number as 0.
            torch.set_flush_denormal(True)
        torch.manual_seed(self.config.model.seed)
        par = self.config.parallel
        if par.world_size > 1:  # the world group (gloo) carries control messages on any device
            init_world("gloo", rendezvous, self.rank, par.world_size)
            init_parallel_groups(device.type, par.tensor_parallel_size, par.pipeline_parallel_size,
                                 par.pipeline_layer_split, par.cpu_communicator,
                                 par.enable_expert_parallel, par.expert_placement)
        if par.expert_dp:
            self._join_expert_dp(par.data_parallel_rank, par.data_parallel_size,
                                 par.data_parallel_store, par.data_parallel_group,
                                 par.expert_placement)
        self.runner = ModelRunner(self.config, self.model_path)

    def _join_expert_dp(self, dp_rank: int, dp_size: int, store, prefix: str,
                        placement=None) -> None:
        import ray

        par = self.config.parallel
        if store is None or par.pipeline_parallel_size > 1:
            raise ValueError("expert parallelism across DP replicas needs the DP coordinator's "
                             "group (raylm serve with --dp > 1) and pipeline_parallel_size 1")
        host = ray.util.get_node_ip_address() if ray.is_initialized() else store[0]
        init_expert_dp(self.rank % par.tensor_parallel_size, par.tensor_parallel_size, dp_rank,
                       dp_size, tuple(store), prefix, host, placement,
                       cuda=self.config.model.torch_device().type == "cuda")

    def reform_expert_dp(self, dp_rank: int, dp_size: int, store,
                         prefix: str) -> Dict[str, List[int]]:
        """Elastic scaling: join the group's next generation (new size, maybe a new rank) and
        load the experts the contiguous placement now gives this rank. Runs between steps,
        with no request in flight anywhere (the scale drained them). Returns `local_experts()`."""
        self._join_expert_dp(dp_rank, dp_size, store, prefix)
        self.runner.model.reload_experts(self.model_path)
        return self.local_experts()

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def capture_graphs(self) -> int:
        return self.runner.capture_graphs()

    def device_info(self) -> Tuple[str, str]:
        """(device, attention backend name) this worker runs on, e.g. ("cpu", "cpu")."""
        return str(self.runner.device), self.runner.backend.name

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(sched)

    def local_experts(self) -> Dict[str, List[int]]:
        """MoE layer name -> the global ids of the experts this worker holds."""
        from raylm.models.moe import FusedMoE

        return {name: list(m.experts) for name, m in self.runner.model.named_modules()
                if isinstance(m, FusedMoE)}

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        """This worker's process id (fault tests stop or kill the process)."""
        import os

        return os.getpid()

    def check_health(self) -> bool:
        return self.runner is not None and self.runner.model is not None
