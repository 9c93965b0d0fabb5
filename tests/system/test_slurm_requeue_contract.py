"""The sbatch template on the local two-node cluster, driven by a minimal rank program that
honours the trainer's contract (save on SIGUSR1/SIGTERM, exit EXIT_REQUEUE, resume from
saved state). This tests the SLURM layer alone: the batch-shell warning signal reaching
the ranks, self-requeue, the requeue limit, per-restart logs, which exit codes requeue; test_slurm_pretrain.py runs the
same template with the real trainer (step signal, preemption)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from slurm.render import JobSpec, render
from vitscale_common.exit_codes import EXIT_FATAL, EXIT_HUNG, EXIT_REQUEUE
from vitscale_common.slurm_config import SlurmConfig

pytestmark = pytest.mark.slow

STEPS = 30
RANK_PROGRAM = textwrap.dedent(f"""
    import json, os, signal, sys, time
    state, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["SLURM_PROCID"])
    path = os.path.join(state, f"rank{{rank}}.json")
    rec = json.load(open(path)) if os.path.exists(path) else {{"step": 0, "starts": [], "signals": []}}
    rec["starts"].append(rec["step"])
    rec.update(world=int(os.environ["SLURM_STEP_NUM_TASKS"]), node=os.environ["SLURMD_NODENAME"],
               restart=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
    json.dump(rec, open(path, "w"))
    stop = []
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    while rec["step"] < steps:
        time.sleep(0.2)
        rec["step"] += 1
        if mode == "hang" and rec["step"] == 3:
            sys.exit({EXIT_HUNG})  # what the watchdog exits with
        if stop:
            rec["signals"].append(stop[0])
            json.dump(rec, open(path, "w"))
            sys.exit({EXIT_FATAL} if mode == "fail-on-signal" else {EXIT_REQUEUE})
        json.dump(rec, open(path, "w"))
    rec["done"] = True
    json.dump(rec, open(path, "w"))
""")


def submit(cluster, tmp_path: Path, mode: str = "normal", **slurm) -> str:
    (tmp_path / "rank_program.py").write_text(RANK_PROGRAM)
    # The limit is well beyond signal_seconds (300), so SLURM's own warning timer never fires
    # during a test: the only warning signal is the one the test sends.
    cfg = SlurmConfig(nodes=2, cpus_per_task=2, time="15:00", **slurm)
    job = JobSpec(
        "pretrain",
        "contract",
        [sys.executable, str(tmp_path / "rank_program.py"), str(tmp_path), str(STEPS), mode],
        cfg,
        tmp_path / "logs",
        "test",
    )
    (tmp_path / "logs").mkdir()
    (tmp_path / "job.sbatch").write_text(render(job))
    return cluster.sbatch(tmp_path / "job.sbatch")


def wait_steps(cluster, tmp_path: Path, at_least: int) -> None:
    cluster.wait_for_file(tmp_path / "rank0.json", rf'"step": ([{at_least}-9]|\d\d)', timeout=60)


def ranks(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_warning_signal_saves_requeues_and_resumes(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, tmp_path)
    wait_steps(slurm_cluster, tmp_path, 3)
    # What `--signal=B:USR1@S` does before the time limit: signal the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm_cluster.wait_state(job_id, {"COMPLETED"}, timeout=90)
    assert info["Restarts"] == "1"
    for rec in ranks(tmp_path):
        assert rec["done"] and rec["step"] == STEPS
        assert rec["signals"] == [10]  # SIGUSR1 reached the rank through the batch shell and srun
        assert rec["starts"][0] == 0 and 0 < rec["starts"][1] < STEPS  # resumed, not restarted
        assert rec["world"] == 2 and rec["restart"] == 1
    assert {rec["node"] for rec in ranks(tmp_path)} == {"n1", "n2"}
    out = (tmp_path / "logs" / f"contract-{job_id}.out").read_text()
    assert "restart 0 on" in out and "restart 1 on" in out and f"step exited with {EXIT_REQUEUE}" in out
    # One log per rank and restart.
    assert sorted(p.name for p in (tmp_path / "logs").glob("*.log")) == [
        f"contract-{job_id}-r{i}-{r}.log" for i in (0, 1) for r in (0, 1)
    ]


def test_requeue_limit_fails_the_job(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, tmp_path, max_requeues=0)
    wait_steps(slurm_cluster, tmp_path, 3)
    slurm_cluster.run("scancel", "--signal=USR1", job_id)  # to the steps directly
    info = slurm_cluster.wait_state(job_id, {"FAILED"}, timeout=60)
    assert info["Restarts"] == "0"
    assert all(not rec.get("done") for rec in ranks(tmp_path))
    assert "not requeueing" in (tmp_path / "logs" / f"contract-{job_id}.out").read_text()


def test_a_hang_is_requeued_once(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, tmp_path, "hang")
    info = slurm_cluster.wait_state(job_id, {"FAILED"}, timeout=90)
    assert info["Restarts"] == "1" and info["ExitCode"] == f"{EXIT_HUNG}:0"
    out = (tmp_path / "logs" / f"contract-{job_id}.out").read_text()
    assert out.count("requeueing job") == 1 and "hung again" in out


def test_a_failure_after_the_warning_signal_is_not_requeued(slurm_cluster, tmp_path):
    job_id = submit(slurm_cluster, tmp_path, "fail-on-signal")
    wait_steps(slurm_cluster, tmp_path, 3)
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    info = slurm_cluster.wait_state(job_id, {"FAILED"}, timeout=60)
    assert info["Restarts"] == "0" and info["ExitCode"] == f"{EXIT_FATAL}:0"
    assert f"failed with {EXIT_FATAL}: not requeued" in (tmp_path / "logs" / f"contract-{job_id}.out").read_text()
