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
stop_pidfile "$STATE/run/slurmd-n1.pid"
stop_pidfile "$STATE/run/slurmd-n2.pid"
stop_pidfile "$STATE/run/slurmctld.pid"
stop_pidfile "$STATE/run/munged.pid"
echo "stopped slurm test cluster in $STATE"
