# Shared by start.sh / stop.sh: where the cluster's state lives.
# The state dir (config, spool, logs, munge socket) is the first argument, else
# $VITSCALE_SLURM_DIR, else /tmp/vitscale-slurm; it must be outside the repository.
STATE="${1:-${VITSCALE_SLURM_DIR:-/tmp/vitscale-slurm}}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
export SLURM_CONF="$STATE/slurm.conf"
PATH="$PATH:/usr/sbin"

# Stop the daemons whose pids are in the given files (only those processes): signal them
# all, wait up to 10 s for them to go, then kill what is left.
stop_pidfiles() {
    local pids=() f pid i
    for f in "$@"; do
        [ -s "$f" ] && pid="$(cat "$f")" && kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$f"
    done
    for i in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
