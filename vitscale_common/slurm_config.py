"""The `slurm` config section: the resources and launch policy of one SLURM job.

Every stage config (prep, pretrain, finetune) carries this section so that
`vit-submit STAGE CONFIG` knows how to run it; the training code itself never reads it
(it learns its place in the job from SLURM's environment, see pretrain/runtime/distributed.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

CONTAINER_RUNTIMES = ("none", "pyxis", "apptainer")
# sbatch's time formats that contain a separator ([D-]HH:MM[:SS], MM:SS, D-HH); a bare
# number (minutes to sbatch) is refused because it is what YAML makes of an unquoted HH:MM:SS.
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){1,2}|UNLIMITED|INFINITE)$")


@dataclass
class SlurmConfig:
    nodes: int = 1  # nodes per job (for prep: per array task)
    gpus_per_node: int = 0  # GPUs per node; one training rank per GPU, one per node when 0 (CPU)
    gpu: str = ""  # GPU kind from configs/plan/gpus.yaml that vit-plan and vit-submit predict for; empty: none
    cpus_per_task: int = 8  # CPU cores per rank (data-loader workers + the rank itself)
    mem: str = ""  # memory per node as sbatch spells it ("0" = all, "480G"); empty: cluster default
    partition: str = ""  # partition to submit to; empty: the cluster's default partition
    time: str = "24:00:00"  # wall-time limit per job run, quoted "[D-]HH:MM:SS" (each requeue gets it again)
    account: str = ""  # account to charge; empty: the user's default
    qos: str = ""  # quality of service; empty: the partition's default
    array_tasks: int = 1  # prep only: number of convert tasks (a job array), each one slice of the plan
    array_parallel: int = 0  # prep only: at most this many array tasks at once (0 = no limit)
    container_runtime: str = "none"  # none | pyxis (srun --container-image) | apptainer (apptainer exec)
    container_image: str = ""  # image for the runtime: a squashfs/.sif path or registry reference
    container_mounts: List[str] = field(default_factory=list)  # "src:dst" bind mounts (data, run dir)
    signal_seconds: int = 300  # send USR1 this long before the time limit so the ranks can checkpoint
    max_requeues: int = 20  # give up (fail the job) after this many self-requeues
    log_dir: str = ""  # where job logs go; empty: <run dir>/slurm (prep: <output>/slurm)
    env: Dict[str, str] = field(default_factory=dict)  # extra environment for every rank (e.g. NCCL_*)
    extra_sbatch: List[str] = field(default_factory=list)  # extra "#SBATCH" options verbatim, e.g. "--exclusive"
    setup: List[str] = field(default_factory=list)  # shell lines run before launching (module load, venv)
    python: Optional[str] = None  # python to run stages with; default: the interpreter vit-submit runs under

    @property
    def tasks_per_node(self) -> int:
        """Ranks per node: one per GPU, or one per node on a CPU-only cluster."""
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def validate(self, where: str = "slurm") -> None:
        """Raise a one-line error naming the field for values sbatch would reject later."""
        from vitscale_common.config_loader import ConfigError

        if self.nodes < 1:
            raise ConfigError(f"{where}.nodes: must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"{where}.gpus_per_node: must be >= 0, got {self.gpus_per_node}")
        if self.cpus_per_task < 1:
            raise ConfigError(f"{where}.cpus_per_task: must be >= 1, got {self.cpus_per_task}")
        if self.array_tasks < 1:
            raise ConfigError(f"{where}.array_tasks: must be >= 1, got {self.array_tasks}")
        if self.container_runtime not in CONTAINER_RUNTIMES:
            raise ConfigError(
                f"{where}.container_runtime: must be one of {', '.join(CONTAINER_RUNTIMES)}, "
                f"got {self.container_runtime!r}"
            )
        if self.container_runtime != "none" and not self.container_image:
            raise ConfigError(f"{where}.container_image: required with container_runtime={self.container_runtime}")
        if not _TIME.match(self.time):
            raise ConfigError(
                f'{where}.time: {self.time!r} is not a limit like "24:00:00" or "2-00:00:00" '
                "(quote it in YAML and overrides: unquoted, 24:00:00 reads as the number 86400)"
            )
        if self.signal_seconds < 0 or self.max_requeues < 0:
            raise ConfigError(f"{where}.signal_seconds and max_requeues must be >= 0")
        for line in self.extra_sbatch:
            if not line.startswith("-") or "\n" in line:
                raise ConfigError(f"{where}.extra_sbatch: {line!r} is not one sbatch option like '--exclusive'")
