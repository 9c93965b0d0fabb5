"""vit-submit: turn a stage config into a SLURM job (or a chain of them) and submit it.

    vit-submit {prep,pretrain,finetune} CONFIG [CONFIG ...] [key=value ...] [--nodes N --gpus-per-node G
               --partition P --time T --account A] [--dry-run] [--force]
    vit-submit pipeline PIPELINE_CONFIG [...same flags]
    vit-submit status RUN_DIR

The stage's config (with its `_base_` files and the overrides merged) is frozen into the
job's log folder and the job runs that file, so a requeued job restarts exactly the same
command; the training stages resume from their run directory by themselves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slurm.pipeline import load_pipeline
from slurm.plan_check import check_plan
from slurm.render import JobSpec, render
from slurm.status import JOBS_FILE, status_lines
from vitscale_common.atomic import atomic_write_text
from vitscale_common.config_loader import ConfigError, parse_overrides, read_yaml
from vitscale_common.errors import UserError, cli_entry
from vitscale_common.slurm_config import SlurmConfig

# The module each stage runs (`python -m MODULE CONFIG`), and the config key naming the
# folder the stage writes (its job logs go next to or into it, see default_log_dir).
STAGE_MODULES = {"pretrain": "pretrain.train", "finetune": "pretrain.finetune", "prep": "data_prep.cli"}
OUTPUT_KEYS = {"pretrain": "run.dir", "finetune": "run.dir", "prep": "output"}
_SAFE_PATH = re.compile(r"^[\w./+@:,-]+$")


@dataclasses.dataclass
class StageJobs:
    """A stage rendered into one or two jobs (convert array + merge); the last one gates the next stage."""

    stage: str
    log_dir: Path
    jobs: list[JobSpec]


# --------------------------------------------------------------------------- config
def _resolved(files: Sequence[str | Path], overrides: Sequence[str]) -> DictConfig:
    cfg = OmegaConf.create({})
    for source, layer in [*((str(f), read_yaml(f)) for f in files), ("overrides", parse_overrides(overrides))]:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {str(e).splitlines()[0]}") from None
    return cfg


def slurm_section(cfg: DictConfig, where: str) -> SlurmConfig:
    """The config's `slurm` section, typed and checked (errors name the file and key)."""
    try:
        node = OmegaConf.merge(OmegaConf.structured(SlurmConfig), cfg.get("slurm") or {})
        section = OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"{where}: slurm.{key}: {str(e).splitlines()[0]}") from None
    section.validate(f"{where}: slurm")
    return section


def _output_dir(cfg: DictConfig, stage: str, where: str) -> Path:
    key = OUTPUT_KEYS[stage]
    value = OmegaConf.select(cfg, key, default=None)
    if not value:
        raise ConfigError(f"{where}: `{key}` must be set: the job's logs and state go there")
    return Path(str(value)).absolute()


def default_log_dir(stage: str, out: Path) -> Path:
    # A dataset folder holds only the dataset (it is compared byte for byte), so convert
    # logs go next to it; a run directory has room for its own job logs.
    return out.with_name(out.name + ".slurm") if stage == "prep" else out / "slurm"


def _python(s: SlurmConfig) -> str:
    return s.python or sys.executable


def flag_overrides(args: argparse.Namespace, training: bool) -> list[str]:
    """--nodes/--gpus-per-node (training stages only) and --partition/--time/--account as slurm.* overrides."""
    pairs = [("partition", args.partition), ("time", args.time), ("account", args.account)]
    if training:
        pairs += [("nodes", args.nodes), ("gpus_per_node", args.gpus_per_node)]
    # JSON-quoted: unquoted, YAML would read 48:00:00 as the base-60 number 172800.
    return [f"slurm.{k}={json.dumps(v)}" for k, v in pairs if v is not None]


# --------------------------------------------------------------------------- stages
def build_stage(stage: str, configs: Sequence[str | Path], overrides: Sequence[str] = ()) -> tuple[StageJobs, str]:
    """Render one stage from its config files (merged in order; none: overrides only) and
    overrides: (its jobs, the frozen config text they run)."""
    cfg = _resolved(configs, overrides)
    config = " ".join(map(str, configs)) or f"{stage} overrides"
    s = slurm_section(cfg, str(config))
    out = _output_dir(cfg, stage, str(config))
    log_dir = Path(s.log_dir).absolute() if s.log_dir else default_log_dir(stage, out)
    if not _SAFE_PATH.match(str(log_dir)):
        raise ConfigError(f"{config}: log folder {str(log_dir)!r} has characters sbatch cannot take unquoted")
    frozen = log_dir / f"{stage}-config.yaml"
    py = [_python(s), "-m", STAGE_MODULES[stage]]
    name = f"vit-{stage}-{out.name}"  # the output folder tells jobs of different runs apart
    if stage == "prep":
        # Convert as an array (task i converts slice i of the plan), then one merge job.
        # (vit-prep reads its slice from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.)
        convert = JobSpec(
            "prep",
            f"{name}-convert",
            [*py, "convert", "--config", str(frozen)],
            s,
            log_dir,
            str(config),
            array=s.array_tasks,
        )
        merge_slurm = dataclasses.replace(s, nodes=1, gpus_per_node=0)
        merge = JobSpec("merge", f"{name}-merge", [*py, "merge", str(out)], merge_slurm, log_dir, str(config))
        jobs = [convert, merge]
    else:
        jobs = [JobSpec(stage, name, [*py, str(frozen)], s, log_dir, str(config))]
    return StageJobs(stage, log_dir, jobs), OmegaConf.to_yaml(cfg)


def sbatch(script_path: Path, dependency: str | None) -> str:
    """Submit a rendered script; returns the job id."""
    cmd = ["sbatch", "--parsable"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    try:
        proc = subprocess.run([*cmd, str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("sbatch not found: run vit-submit on a SLURM login node (or use --dry-run)") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch {script_path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_stage(stage: StageJobs, frozen_config: str, dependency: str | None, dry_run: bool) -> str | None:
    """Write the frozen config and scripts, submit them chained; returns the id gating what follows."""
    if dry_run:
        for job in stage.jobs:
            after = f" (after {dependency})" if dependency else ""
            print(f"# ---- {job.name}{after}: sbatch script\n{render(job)}")
        return dependency
    stage.log_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage.log_dir / f"{stage.stage}-config.yaml", frozen_config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for job in stage.jobs:
        script = stage.log_dir / f"{job.name}-{stamp}.sbatch"
        atomic_write_text(script, render(job))
        dependency = sbatch(script, dependency)
        record = {
            "job_id": dependency,
            "name": job.name,
            "stage": job.stage,
            "script": str(script),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        with open(stage.log_dir / JOBS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"submitted {job.name}: job {dependency}  (logs: {stage.log_dir})")
    return dependency


# --------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vit-submit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*STAGE_MODULES, "pipeline"):
        sp = sub.add_parser(name, help=f"submit the {name} {'chain' if name == 'pipeline' else 'stage'}")
        if name == "pipeline":
            sp.add_argument(
                "items",
                nargs="+",
                metavar="CONFIG|key=value",
                help="the pipeline config naming the stage configs, then overrides (vars.NAME=...)",
            )
        else:
            sp.add_argument(
                "items",
                nargs="+",
                metavar="CONFIG|key=value",
                help="YAML configs (merged in order), then key=value overrides",
            )
        sp.add_argument("--nodes", type=int, help="slurm.nodes (training stages)")
        sp.add_argument("--gpus-per-node", type=int, help="slurm.gpus_per_node (training stages)")
        sp.add_argument("--partition", help="slurm.partition")
        sp.add_argument("--time", help="slurm.time, e.g. 24:00:00")
        sp.add_argument("--account", help="slurm.account")
        sp.add_argument("--dependency", help="job id this submission waits for (afterok)")
        sp.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
        sp.add_argument("--force", action="store_true", help="submit a GPU config vit-plan predicts will not fit")
    st = sub.add_parser("status", help="jobs and progress of a submitted run")
    st.add_argument("run_dir", help="the run directory (or a prep output folder)")
    return p.parse_args(argv)


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "status":
        print("\n".join(status_lines(Path(args.run_dir))))
        return 0
    configs = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if args.command == "pipeline":
        if len(configs) != 1:
            raise UserError(f"pipeline takes one pipeline config, got {len(configs)}: {' '.join(configs)}")
        stages = load_pipeline(configs[0], overrides)
    else:
        stages = [(args.command, configs, overrides)]
    # Render every stage before submitting any, so a bad config in the chain submits nothing.
    built = [
        build_stage(stage, files, [*more, *flag_overrides(args, stage != "prep")]) for stage, files, more in stages
    ]
    for (stage, files, more), (jobs, _) in zip(stages, built):
        if stage == "pretrain":
            job = jobs.jobs[0]
            check_plan(job.slurm, _python(job.slurm), files, [*more, *flag_overrides(args, True)], args.force)
    dependency = args.dependency
    for jobs, frozen in built:
        dependency = submit_stage(jobs, frozen, dependency, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
