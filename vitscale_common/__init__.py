"""Helpers every vitscale package uses: user-facing errors, config loading, atomic writes, the slurm section."""
