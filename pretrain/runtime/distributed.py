"""Where this process sits in the job, and the process group that connects it.

One entry point runs unchanged under `torchrun` / the `deepspeed` launcher (they export
RANK and WORLD_SIZE, read first), under `srun` (SLURM_PROCID / SLURM_LOCALID /
SLURM_STEP_NUM_TASKS: the job-wide SLURM_NTASKS is also visible to a batch shell that is
not a step, so it must not be read), or as one plain process. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import re
import socket
import subprocess
from typing import Mapping

import torch

from vitscale_common.errors import UserError

# Ports derived from the SLURM job id fall in this range, clear of the ephemeral ports.
_PORT_BASE, _PORT_SPAN = 20000, 20000


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # 'torchrun' | 'srun' | 'single'


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UserError(f"environment variable {key}={env[key]!r} is not an integer") from None


def _scontrol(*args: str) -> str:
    try:
        return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"`scontrol {' '.join(args)}` failed: {e}") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as `gpu[003-010],gpu012`."""
    return _scontrol("show", "hostnames", nodelist).split()[0]


def resolve_node_addr(host: str) -> str:
    """`host` itself when it resolves; otherwise its NodeAddr as slurmctld knows it."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", host))
        if not match:
            raise UserError(f"cannot resolve SLURM node {host!r} and scontrol reports no NodeAddr") from None
        return match.group(1)


def slurm_port(job_id: str) -> int:
    # Every task of the job computes the same port without talking to the others.
    return _PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % _PORT_SPAN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; never guesses a world size from job-wide settings."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=_int(env, "RANK"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            world_size=_int(env, "WORLD_SIZE"),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise UserError("inside a SLURM step but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set")
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=_int(env, "SLURM_STEP_NUM_TASKS"),
            master_addr=env.get("MASTER_ADDR") or resolve_node_addr(first_host(nodelist)),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(env.get("SLURM_JOB_ID", "0")),
            launcher="srun",
        )
    return DistEnv(
        rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=_free_port(), launcher="single"
    )


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_index(local_rank: int, visible: int) -> int | None:
    """Which of the GPUs this process sees it uses (None: no GPU).

    Where every rank of a node sees all its GPUs (torchrun, the deepspeed launcher, srun
    without GPU binding) that is the local rank; where srun binds GPUs per task
    (`--gpus-per-task=1`) each task sees one device, 0, whatever its local rank.
    """
    if visible == 0:
        return None
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise UserError(
        f"local rank {local_rank} but only {visible} GPUs are visible to it: run one rank per GPU "
        "(srun: --ntasks-per-node equal to the GPUs per node, or --gpus-per-task=1)"
    )


def device(dist_env: DistEnv) -> torch.device:
    index = device_index(dist_env.local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if index is None:
        return torch.device("cpu")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def exported_env(dist_env: DistEnv, visible_gpus: int) -> dict[str, str]:
    """The variables DeepSpeed and torch.distributed read. DeepSpeed picks its GPU from
    LOCAL_RANK, so on GPUs that is the device index among the visible ones."""
    index = device_index(dist_env.local_rank, visible_gpus)
    return {
        "RANK": str(dist_env.rank),
        "LOCAL_RANK": str(dist_env.local_rank if index is None else index),
        "WORLD_SIZE": str(dist_env.world_size),
        "MASTER_ADDR": dist_env.master_addr,
        "MASTER_PORT": str(dist_env.master_port),
    }


def init_process_group(dist_env: DistEnv, timeout_s: float) -> None:
    """Join the job's process group (DeepSpeed's helper, so its comm layer knows it)."""
    import deepspeed

    # srun and single runs do not export these; under srun's per-task GPU binding the local
    # rank is not the device index DeepSpeed would take it for.
    os.environ.update(exported_env(dist_env, torch.cuda.device_count() if torch.cuda.is_available() else 0))
    device(dist_env)
    deepspeed.init_distributed(
        dist_backend=backend(),
        auto_mpi_discovery=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=dist_env.rank,
        world_size=dist_env.world_size,
    )


def shutdown() -> None:
    """Leave the process group in step with the other ranks, before the interpreter exits.

    Left to interpreter teardown, the communication threads are destroyed in arbitrary
    order and a rank can abort (SIGABRT, "terminate called without an active exception")
    after its work is done, which a launcher reports as a failed job.
    """
    import gc
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # DeepSpeed's communication backend (made by deepspeed.initialize or zero.Init) still holds
    # the group: dropped now, while the interpreter is whole, its threads are joined here, not
    # in teardown, where they can abort an otherwise finished rank.
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.cdb = None
        gc.collect()
