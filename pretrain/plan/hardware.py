"""The cluster a plan is for: the GPU table (configs/plan/gpus.yaml plus the user's files), the
job's shape, and what the planner assumes where it measures nothing (configs/plan/defaults.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Sequence

from omegaconf import MISSING

from vitscale_common.config_loader import ConfigError, load_config

PLAN_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "plan"
GIB = 2**30


@dataclass
class Gpu:
    memory_gib: float  # device memory an idle card offers
    peak_bf16_tflops: float  # dense bf16 peak
    nvlink_gbs: float  # GB/s one GPU sends within its node
    network_gbs: float  # GB/s one GPU sends to other nodes
    match: str = ""  # fragment of torch.cuda.get_device_name() naming this card

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GIB


@dataclass
class GpuTable:
    gpus: Dict[str, Gpu] = field(default_factory=dict)


def load_gpus(extra_files: Sequence[str | Path] = ()) -> dict[str, Gpu]:
    """The shipped GPU table with the user's files merged over it (a file adds or replaces kinds)."""
    return load_config(GpuTable, [PLAN_CONFIGS / "gpus.yaml", *extra_files]).gpus


@dataclass
class Assumptions:
    """What the planner assumes where it measures nothing; values in configs/plan/defaults.yaml."""

    mfu: float = MISSING  # model FLOPs utilisation when no GPU-suite result calibrates it
    cuda_context_gib: float = MISSING  # CUDA context, cuBLAS/NCCL workspaces: memory torch does not allocate
    allocator_margin: float = MISSING  # caching-allocator fragmentation, as a fraction of the tensors' bytes
    fit_margin: float = MISSING  # vit-submit refuses only a config predicted over memory by more than this fraction
    comm_efficiency: float = MISSING  # bandwidth collectives reach, as a fraction of the links' nominal one
    loader_images_per_core_s: Dict[str, float] = MISSING  # training images one loader core prepares, by data.decode
    checkpoint_write_gbs: float = MISSING  # GB/s the job's checkpoint writes reach on the shared file system
    host_copy_gbs: float = MISSING  # GB/s of a rank's device-to-host copy before a background save


@dataclass
class _AssumptionFile:
    assume: Assumptions = field(default_factory=Assumptions)


def load_assumptions(overrides: Sequence[str] = ()) -> Assumptions:
    """configs/plan/defaults.yaml with `assume.KEY=VALUE` overrides."""
    return load_config(_AssumptionFile, [PLAN_CONFIGS / "defaults.yaml"], overrides).assume


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str  # a kind of the GPU table

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def gpu_of(cluster: Cluster, table: dict[str, Gpu]) -> Gpu:
    if cluster.gpu not in table:
        raise ConfigError(f"GPU kind {cluster.gpu!r} is not in the GPU table (known: {', '.join(sorted(table))}); "
                          f"add it in a YAML file passed with --hardware")  # fmt: skip
    return table[cluster.gpu]
