"""One rank's fatal error ends the whole job fast, on the local two-node cluster.

vit-pretrain runs under vit-submit (one rank per node, gloo). Rank 1 raises in step 6 and
then stays alive for 20 s with its sockets open, as a rank does whose NCCL teardown hangs:
gloo cannot tell rank 0 that its peer is gone, so rank 0 sits in the step's collective.
The failure watch must end rank 0 within seconds with EXIT_FATAL and the failing rank's
message; the job must fail (not requeue) and `vit-submit status` must show the message.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import time

import pytest

from vitscale_common.exit_codes import EXIT_FATAL

pytestmark = pytest.mark.slow

FAULT_STEP, LINGER_S = 6, 20
# Imported by every Python process the job starts (PYTHONPATH); acts on the chosen rank only.
FAULT = textwrap.dedent(f"""
    import atexit, os, time
    if os.environ.get("SLURM_PROCID") == "1" and os.environ.get("SLURM_STEP_ID") is not None:
        from pretrain.train import loop

        original = loop.Trainer.train_step

        def failing(self, images, targets):
            if self.engine.global_steps + 1 == {FAULT_STEP}:
                atexit.register(time.sleep, {LINGER_S})  # the process outlives its error
                raise RuntimeError("injected fault: an illegal memory access was encountered")
            return original(self, images, targets)

        loop.Trainer.train_step = failing
""")


def test_one_rank_raising_fails_the_job_within_60_s(slurm_cluster, runs, digits_shards, tmp_path):
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAULT)
    run = tmp_path / "run"
    submit = [str(runs.bin / "vit-submit"), "pretrain", str(runs.pretrain_demo), f"data.path={digits_shards}",
              f"run.dir={run}", *runs.tiny_pretrain, "slurm.nodes=2", "slurm.cpus_per_task=2",
              'slurm.time="10:00"', "train.watchdog_s=600"]  # fmt: skip
    # sbatch passes the submitting environment on to the job.
    p = subprocess.run(submit, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(fault)})
    assert p.returncode == 0, p.stderr
    job_id = re.search(r"submitted \S+: job (\d+)", p.stdout).group(1)

    failure = run / "failure.json"
    slurm_cluster.wait_for_file(failure, "injected fault", timeout=180)
    failed_at = time.monotonic()
    info = slurm_cluster.wait_state(job_id, {"FAILED"}, timeout=60)
    assert time.monotonic() - failed_at < 60
    assert info["Restarts"] == "0" and info["ExitCode"] == f"{EXIT_FATAL}:0", info

    rank0 = (run / "slurm" / f"vit-pretrain-run-{job_id}-r0-0.log").read_text(errors="replace")
    message = f"rank 1 (n2) failed after step {FAULT_STEP - 1}: RuntimeError: injected fault"
    assert f"fatal: {message}" in rank0 and f"rank 0 exits with {EXIT_FATAL}" in rank0, rank0[-3000:]
    batch = (run / "slurm" / f"vit-pretrain-run-{job_id}.out").read_text()
    assert f"failed with {EXIT_FATAL}: not requeued" in batch and "requeueing" not in batch, batch

    status = subprocess.run([str(runs.bin / "vit-submit"), "status", str(run)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert f"failed: {message}" in status.stdout, status.stdout
    assert f"its log: {run / 'slurm' / f'vit-pretrain-run-{job_id}-r0-1.log'}" in status.stdout, status.stdout
