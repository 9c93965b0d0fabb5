"""vit-pretrain under the rendered sbatch script on the local two-node cluster (one rank per
node, gloo): a warning signal or a preemption mid-run saves, requeues the job, resumes, and
ends with exactly the weights of an uninterrupted run started by hand (torchrun, 2 ranks)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import scan
from pretrain.export import consolidated_state_dict
from pretrain.run_log import read_metrics

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO = REPO / "configs" / "pretrain" / "demo.yaml"
STEPS = 60
# A tiny model so a step is fast, enough steps that a signal lands mid-run.
SMALL = [
    "model.depth=2", "model.width=32", "model.heads=2", "model.mlp_dim=64",
    f"train.steps={STEPS}", "train.batch_size=16", "train.log_every=1", "train.optim.warmup_steps=3",
    "checkpoint.every=20", "checkpoint.keep=2", "data.workers=0", "eval.every=0", "eval.fewshot_shots=[]",
]
# Whole nodes (2 CPUs each), so a job of the high partition has to preempt it.
SLURM = ["slurm.nodes=2", "slurm.cpus_per_task=2", "slurm.time=10:00", "slurm.max_requeues=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits") / "shards"
    subprocess.run([str(BIN / "vit-prep"), "convert", "--source", "digits", "--output", str(out)], check=True,
                   capture_output=True, text=True)
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = scan(run_dir / "checkpoints").newest
    assert newest is not None and newest.name == f"step-{STEPS:08d}", newest
    return consolidated_state_dict(newest)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same run by hand: torchrun, 2 ranks, never interrupted."""
    run = tmp_path_factory.mktemp("by_hand") / "run"
    p = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_port=29731", "-m", "pretrain.train",
                        str(DEMO), f"data.path={shards}", f"run.dir={run}", *SMALL],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return final_weights(run)


def submit(run: Path, shards: Path) -> str:
    p = subprocess.run([str(BIN / "vit-submit"), "pretrain", str(DEMO), f"data.path={shards}", f"run.dir={run}",
                        *SMALL, *SLURM], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return re.search(r"submitted \S+: job (\d+)", p.stdout).group(1)


def wait_logged_step(run: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in read_metrics(run)):
        assert time.monotonic() < deadline, f"{run}: step {step} not logged within {timeout} s"
        time.sleep(0.2)


def assert_resumed_and_identical(cluster, job_id: str, run: Path, reference, signum: int) -> None:
    info = cluster.wait_state(job_id, {"COMPLETED"}, timeout=180)
    assert info["Restarts"] == "1"
    logs = run / "slurm"
    batch = (logs / f"vit-pretrain-run-{job_id}.out").read_text()
    assert "step exited with 85" in batch and "requeueing" in batch
    first, second = ((logs / f"vit-pretrain-run-{job_id}-r{i}-0.log").read_text() for i in (0, 1))
    assert f"stop requested (signal {signum})" in first
    saved = int(re.search(r"resuming from \S+ \(step (\d+)", second).group(1))
    assert 0 < saved < STEPS
    weights = final_weights(run)
    assert weights.keys() == reference.keys()
    for k in weights:
        assert torch.equal(weights[k], reference[k]), k


def test_warning_signal_mid_pretraining_resumes_to_identical_weights(slurm_cluster, shards, reference, tmp_path):
    run = tmp_path / "run"
    job_id = submit(run, shards)
    wait_logged_step(run, 5)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)
    assert_resumed_and_identical(slurm_cluster, job_id, run, reference, signum=10)


def test_preemption_saves_in_grace_time_and_resumes_to_identical_weights(slurm_cluster, shards, reference, tmp_path):
    run = tmp_path / "run"
    job_id = submit(run, shards)
    wait_logged_step(run, 5)
    high = slurm_cluster.sbatch("--partition=high", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                                f"--output={tmp_path}/high-%j.out", "--wrap", "srun true")
    slurm_cluster.wait_state(high, {"COMPLETED"}, timeout=90)
    assert_resumed_and_identical(slurm_cluster, job_id, run, reference, signum=15)
