#!/usr/bin/env bash
# Stop the local test cluster started by start.sh (the same STATE_DIR / VITSCALE_SLURM_DIR).
# Jobs still running are killed with it. Only the daemons named by the state dir's pid files
# are signalled.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/common.sh"

if [ -s "$STATE/run/slurmctld.pid" ]; then
    scancel --user="$(id -un)" >/dev/null 2>&1 && sleep 1
fi
stop_pidfiles "$STATE/run/slurmd-n1.pid" "$STATE/run/slurmd-n2.pid" "$STATE/run/slurmctld.pid"
stop_pidfiles "$STATE/run/munged.pid"  # last: the others authenticate through it while stopping
echo "stopped slurm test cluster in $STATE"
