"""vit-pretrain under the rendered sbatch script on the local two-node cluster (one rank per
node, gloo): a warning signal or a preemption mid-run saves, requeues the job, resumes, and
ends with exactly the weights of an uninterrupted run started by hand (torchrun, 2 ranks)."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.run_log import read_metrics

pytestmark = pytest.mark.slow

# Whole nodes (2 CPUs each), so a job of the high partition has to preempt it.
SLURM = ["slurm.nodes=2", "slurm.cpus_per_task=2", "slurm.time=10:00", "slurm.max_requeues=2"]


def submit(runs, run: Path, shards: Path) -> str:
    p = subprocess.run([str(runs.bin / "vit-submit"), "pretrain", str(runs.pretrain_demo), f"data.path={shards}",
                        f"run.dir={run}", *runs.tiny_pretrain, *SLURM], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return re.search(r"submitted \S+: job (\d+)", p.stdout).group(1)


def wait_logged_step(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in read_metrics(run)):
        assert time.monotonic() < deadline, f"{run}: step {step} not logged within {timeout} s"
        time.sleep(0.2)


def assert_resumed_and_identical(cluster, runs, job_id: str, run: Path, by_hand: Path, signum: int) -> None:
    info = cluster.wait_state(job_id, {"COMPLETED"}, timeout=180)
    assert info["Restarts"] == "1"
    logs = run / "slurm"
    batch = (logs / f"vit-pretrain-run-{job_id}.out").read_text()
    assert "step exited with 85" in batch and "requeueing" in batch
    first, second = ((logs / f"vit-pretrain-run-{job_id}-r{i}-0.log").read_text() for i in (0, 1))
    assert f"stop requested (signal {signum})" in first
    saved = int(re.search(r"resuming from \S+ \(step (\d+)", second).group(1))
    assert 0 < saved < runs.steps
    runs.assert_same_weights(runs.final_weights(run, runs.steps), runs.final_weights(by_hand, runs.steps))


def test_warning_signal_mid_pretraining_resumes_to_identical_weights(slurm_cluster, runs, digits_shards,
                                                                     pretrain_by_hand, tmp_path):
    run = tmp_path / "run"
    job_id = submit(runs, run, digits_shards)
    wait_logged_step(run, 5)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    assert_resumed_and_identical(slurm_cluster, runs, job_id, run, pretrain_by_hand, signum=10)


def test_preemption_saves_in_grace_time_and_resumes_to_identical_weights(slurm_cluster, runs, digits_shards,
                                                                         pretrain_by_hand, tmp_path):
    run = tmp_path / "run"
    job_id = submit(runs, run, digits_shards)
    wait_logged_step(run, 5)
    high = slurm_cluster.sbatch("--partition=high", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                f"--output={tmp_path}/high-%j.out", "--wrap", "srun true")
    slurm_cluster.wait_state(high, {"COMPLETED"}, timeout=90)
    assert_resumed_and_identical(slurm_cluster, runs, job_id, run, pretrain_by_hand, signum=15)
