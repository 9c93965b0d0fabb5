# Shared by start.sh / stop.sh: where the cluster's state lives.
# The state dir (config, spool, logs, munge socket) is the first argument, else
# $VITSCALE_SLURM_DIR, else /tmp/vitscale-slurm; it must be outside the repository.
STATE="${1:-${VITSCALE_SLURM_DIR:-/tmp/vitscale-slurm}}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
export SLURM_CONF="$STATE/slurm.conf"
PATH="$PATH:/usr/sbin"

# Kill the daemon whose pid is in file $1 (only that process), waiting for it to go.
stop_pidfile() {
    local pidfile="$1" pid i
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}
