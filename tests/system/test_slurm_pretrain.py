"""vit-pretrain under the rendered sbatch script on the local two-node cluster (one rank per
node, gloo). One job is interrupted twice: `scancel --signal=USR1` mid-run, then, after it
resumed, preemption by a job of the high partition (SIGTERM, GraceTime, kill). Each time the
ranks save and exit 85 and the job requeues itself; it must end with exactly the weights of
an uninterrupted run started by hand (torchrun, 2 ranks). One job for both keeps the tier
within its time budget: every (re)start of the trainer costs tens of seconds here."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.train.run_log import read_metrics

pytestmark = pytest.mark.slow

# Whole nodes (2 CPUs each), so a job of the high partition has to preempt it.
SLURM = ["slurm.nodes=2", "slurm.cpus_per_task=2", 'slurm.time="10:00"', "slurm.max_requeues=3"]


def submit(runs, run: Path, shards: Path) -> str:
    p = subprocess.run(
        [
            str(runs.bin / "vit-submit"),
            "pretrain",
            str(runs.pretrain_demo),
            f"data.path={shards}",
            f"run.dir={run}",
            *runs.tiny_pretrain,
            *SLURM,
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    return re.search(r"submitted \S+: job (\d+)", p.stdout).group(1)


def wait_for(condition, what: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def rank0_log(run: Path, job_id: str, restart: int) -> str:
    path = run / "slurm" / f"vit-pretrain-run-{job_id}-r{restart}-0.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def resumed_at(run: Path, job_id: str, restart: int) -> int | None:
    found = re.search(r"resuming from \S+ \(step (\d+)", rank0_log(run, job_id, restart))
    return int(found.group(1)) if found else None


def last_step(run: Path) -> int:
    return max((r["step"] for r in read_metrics(run)), default=0)


def test_warning_signal_then_preemption_resume_to_identical_weights(
    slurm_cluster, runs, digits_shards, pretrain_by_hand, tmp_path
):
    run = tmp_path / "run"
    job_id = submit(runs, run, digits_shards)

    # 1. The warning signal, to the ranks, a few steps in.
    wait_for(lambda: last_step(run) >= 3, "step 3")
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    wait_for(lambda: resumed_at(run, job_id, 1) is not None, "resume after USR1")
    first_save = resumed_at(run, job_id, 1)
    assert 3 <= first_save < runs.steps
    assert "stop requested (signal 10)" in rank0_log(run, job_id, 0)

    # 2. Preemption: a high-partition job needs both nodes; the low job gets SIGTERM.
    wait_for(lambda: last_step(run) >= first_save + 3, f"step {first_save + 3} after resuming")
    high = slurm_cluster.sbatch(
        "--partition=high",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        f"--output={tmp_path}/high-%j.out",
        "--wrap",
        "srun true",
    )
    slurm_cluster.wait_state(high, {"COMPLETED"}, timeout=90)
    info = slurm_cluster.wait_state(job_id, {"COMPLETED"}, timeout=150)
    assert info["Restarts"] == "2"
    assert "stop requested (signal 15)" in rank0_log(run, job_id, 1)  # saved within the grace time
    assert first_save < resumed_at(run, job_id, 2) < runs.steps

    batch = (run / "slurm" / f"vit-pretrain-run-{job_id}.out").read_text()
    assert batch.count("step exited with 85") == 2 and batch.count("requeueing") == 2
    runs.assert_same_weights(runs.final_weights(run, runs.steps), runs.final_weights(pretrain_by_hand, runs.steps))
