"""The plan's verdict at submission: vit-submit asks `vit-plan` (in the interpreter the stage
will run under, as a subprocess: `slurm` never imports training code) for its one-line summary
and whether the config fits the GPU, and refuses what is predicted over memory by more than
the planner's stated margin."""

from __future__ import annotations

import json
import subprocess
from typing import Sequence

from vitscale_common.errors import UserError
from vitscale_common.slurm_config import SlurmConfig


class PlanRefusal(UserError):
    """A GPU config predicted not to fit; `--force` submits it anyway."""


def plan_verdict(python: str, configs: Sequence[str], overrides: Sequence[str]) -> dict:
    """vit-plan's summary, fit and refusal for a pretraining config (its --json output)."""
    cmd = [python, "-m", "pretrain.plan", *map(str, configs), *overrides, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"vit-plan: {(proc.stderr.strip().splitlines() or ['failed'])[-1].removeprefix('error: ')}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_plan(slurm: SlurmConfig, python: str, configs: Sequence[str], overrides: Sequence[str], force: bool) -> None:
    """Print the plan's summary; raise PlanRefusal for a config that cannot fit. CPU jobs and
    jobs naming no GPU kind (slurm.gpu) are not planned."""
    if slurm.gpus_per_node == 0 or not slurm.gpu:
        return
    verdict = plan_verdict(python, configs, overrides)
    print(f"plan: {verdict['summary']}")
    if verdict["refusal"] and not force:
        raise PlanRefusal(f"{verdict['refusal']} (--force submits it anyway)")
