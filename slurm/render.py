"""Render the one sbatch template (slurm/templates/job.sbatch) for a job.

Every stage runs through the same script: the resources come from the `slurm` config
section, and the stage contributes only its command line (and, for convert, the array).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Sequence

from vitscale_common.exit_codes import EXIT_HUNG, EXIT_REQUEUE
from vitscale_common.slurm_config import SlurmConfig

TEMPLATE = Path(__file__).parent / "templates" / "job.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@dataclasses.dataclass
class JobSpec:
    stage: str  # prep | merge | pretrain | finetune: names the job and its log files
    name: str  # job name (sbatch --job-name)
    command: Sequence[str]  # what every rank runs
    slurm: SlurmConfig
    log_dir: Path
    config: str  # the config file the job was rendered from (comment only)
    array: int = 0  # > 0: a job array of this many tasks (ids 0..array-1)


def _sbatch_options(job: JobSpec) -> list[str]:
    s = job.slurm
    opts = []
    if s.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.mem:
        opts.append(f"--mem={s.mem}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
        if value:
            opts.append(f"--{flag}={value}")
    if job.array > 0:
        limit = f"%{s.array_parallel}" if s.array_parallel > 0 else ""
        opts.append(f"--array=0-{job.array - 1}{limit}")
    opts.extend(s.extra_sbatch)
    return [f"#SBATCH {o}" for o in opts]


def _container(job: JobSpec) -> tuple[str, list[str]]:
    """(extra srun options, command prefix) for the configured container runtime."""
    s = job.slurm
    if s.container_runtime == "pyxis":
        opts = [f"--container-image={s.container_image}", '--container-workdir="$PWD"']
        if s.container_mounts:
            opts.append("--container-mounts=" + shlex.quote(",".join(s.container_mounts)))
        return " ".join(opts) + " ", []
    if s.container_runtime == "apptainer":
        prefix = ["apptainer", "exec", "--nv"]
        for m in s.container_mounts:
            prefix += ["--bind", m]
        return "", prefix + [s.container_image]
    return "", []


def render(job: JobSpec) -> str:
    """The complete sbatch script for `job`."""
    s = job.slurm
    srun_options, prefix = _container(job)
    log_name = "%x-%A_%a" if job.array > 0 else "%x-%j"
    values = {
        "stage": job.stage,
        "config": job.config,
        "job_name": job.name,
        "nodes": s.nodes,
        "tasks_per_node": s.tasks_per_node,
        "world_size": s.world_size,
        "cpus_per_task": s.cpus_per_task,
        "time": s.time,
        "log_dir": str(job.log_dir),  # submit checks it needs no quoting
        "log_name": log_name,
        "signal_seconds": s.signal_seconds,
        "sbatch_options": "\n".join(_sbatch_options(job)),
        "max_requeues": s.max_requeues,
        "exit_requeue": EXIT_REQUEUE,
        "exit_hung": EXIT_HUNG,
        "command": " ".join(shlex.quote(str(w)) for w in [*prefix, *job.command]),
        "setup": "\n".join(s.setup),
        "env": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in sorted(s.env.items())),
        "srun_options": srun_options,
    }
    text = TEMPLATE.read_text()
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise KeyError(f"{TEMPLATE}: no value for {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def parse_sbatch_options(script: str) -> dict[str, str]:
    """The `#SBATCH --key=value` lines of a script (what sbatch itself reads), as a dict."""
    options = {}
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            if line.strip() and not line.startswith("#"):
                break  # sbatch stops reading options at the first command
            continue
        for opt in shlex.split(line[len("#SBATCH") :]):
            key, _, value = opt.lstrip("-").partition("=")
            options[key] = value
    return options
