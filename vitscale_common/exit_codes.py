"""Exit codes a rank hands to the SLURM job script (slurm/templates/job.sbatch).

They are the contract between the training stages and `slurm/`, so they live here, below
both: the template is rendered from these values, and the ranks exit with them.
"""

# "Checkpoint saved (or nothing lost), start me again": the job script requeues on it.
EXIT_REQUEUE = 85
