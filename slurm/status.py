"""`vit-submit status RUN_DIR`: the run's SLURM jobs and how far the run itself got."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from vitscale_common.errors import UserError
from vitscale_common.exit_codes import FAILURE_FILE

JOBS_FILE = "jobs.jsonl"
_FIELDS = ("JobId", "JobName", "JobState", "Reason", "RunTime", "Restarts", "ExitCode", "NodeList")


def job_records(run_dir: Path) -> list[dict]:
    """What vit-submit recorded about the jobs it submitted for this run (oldest first)."""
    # A run directory keeps its job logs in slurm/; a dataset's are in the sibling DIR.slurm.
    for folder in (run_dir / "slurm", run_dir.with_name(run_dir.name + ".slurm"), run_dir):
        path = folder / JOBS_FILE
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise UserError(f"{run_dir}: no {JOBS_FILE} (was this run submitted with vit-submit?)")


def scontrol_jobs(job_id: str) -> list[dict[str, str]]:
    """slurmctld's view of a job (one dict per array task); [] once it has forgotten the job."""
    try:
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    except FileNotFoundError:
        return []
    if proc.returncode != 0:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]


def run_progress(run_dir: Path) -> dict[str, object]:
    """Last logged step and last complete checkpoint, from the run directory's own files."""
    progress: dict[str, object] = {}
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_file():
        progress["last_checkpoint"] = latest.read_text().strip()
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in reversed(metrics.read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written right now
            if "step" in row:
                progress["last_step"] = row["step"]
                break
    return progress


def restarts_logged(log_dir: Path, job_id: str) -> int:
    """Highest restart number the job's batch log announced (survives slurmctld forgetting it)."""
    counts = [0]
    for log in log_dir.glob(f"*-{job_id}*.out"):
        counts += [int(n) for n in re.findall(r"^== .* restart (\d+) on ", log.read_text(errors="replace"), re.M)]
    return max(counts)


def status_lines(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    records = job_records(run_dir)
    log_dir = Path(records[0]["script"]).parent
    lines = []
    for rec in records:
        known = scontrol_jobs(rec["job_id"])
        if not known:
            restarts = restarts_logged(log_dir, rec["job_id"])
            lines.append(f"{rec['job_id']:>10}  {rec['name']:<20} (no longer known to slurmctld)  restarts={restarts}")
        for job in known:
            f = {k: job.get(k, "?") for k in _FIELDS}
            lines.append(
                f"{f['JobId']:>10}  {f['JobName']:<20} {f['JobState']:<11} reason={f['Reason']} "
                f"time={f['RunTime']} restarts={f['Restarts']} exit={f['ExitCode']} nodes={f['NodeList']}"
            )
    progress = run_progress(run_dir)
    lines.append("run: " + (", ".join(f"{k}={v}" for k, v in progress.items()) or "no step logged yet"))
    lines += failure_lines(run_dir, log_dir, records[-1])
    return lines


def failure_lines(run_dir: Path, log_dir: Path, job: dict) -> list[str]:
    """The first fatal error of the run's latest attempt, and the failing rank's log."""
    try:
        failure = json.loads((run_dir / FAILURE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return []
    lines = [f"failed: {failure['message']} ({failure['time']})"]
    log = log_dir / f"{job['name']}-{job['job_id']}-r{failure['restart']}-{failure['rank']}.log"
    if log.is_file():
        lines.append(f"  its log: {log}")
    return lines
