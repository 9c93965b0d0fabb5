"""Exit codes a rank hands to the SLURM job script (slurm/templates/job.sbatch).

They are the contract between the training stages and `slurm/`, so they live here, below
both: the template is rendered from these values, and the ranks exit with them. Any other
non-zero code (1: an uncaught error, 2: a configuration or input error) is a failure too,
and the job script never requeues it.
"""

# "Checkpoint saved (or nothing lost), start me again": the job script requeues on it.
EXIT_REQUEUE = 85
# "Another rank failed; its message is in my log": never requeued, a rerun would fail again.
EXIT_FATAL = 86
# "No progress for train.watchdog_s" (a hung file system or peer): requeued once per job,
# since a restart on other nodes may get past it; a second hang ends the job.
EXIT_HUNG = 87

# The run directory's record of the first fatal error of the latest attempt (rank, host, step,
# message), written by the failing rank and shown by `vit-submit status`.
FAILURE_FILE = "failure.json"
