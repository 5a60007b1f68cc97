"""What Ray is asked for, per worker, for the device the model runs on. One GPU per
worker on CUDA (TP and PP ranks each hold one; Ray sets CUDA_VISIBLE_DEVICES, so the
worker's GPU is cuda:0); CPUs only on CPU. Used by the Ray executor and the Serve builder."""
from __future__ import annotations

from typing import Dict


def placement_device(device: str) -> str:
    """'cuda' or 'cpu': where Ray-placed workers will run. 'auto' is CUDA when the Ray
    cluster has GPUs (without Ray: when this process sees one)."""
    if device != "auto":
        return device
    import ray

    if ray.is_initialized():
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def worker_bundle(cpus: float, device: str) -> Dict[str, float]:
    """One TP/PP worker's placement-group bundle."""
    return {"CPU": cpus, "GPU": 1} if placement_device(device) == "cuda" else {"CPU": cpus}


def group_strategy(device: str, pipeline_parallel_size: int) -> str:
    """STRICT_PACK keeps a CUDA replica's workers on one node (TP over NCCL wants NVLink/PCIe,
    not the network); PACK otherwise (pipeline stages may span nodes, CPU groups fit where
    they can)."""
    return ("STRICT_PACK" if placement_device(device) == "cuda" and pipeline_parallel_size == 1
            else "PACK")
