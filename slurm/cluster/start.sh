#!/usr/bin/env bash
# Start the local two-node SLURM test cluster: munged, slurmctld and two slurmd (n1, n2) on
# loopback, with partitions `low` (default, preemptible by requeue) and `high`.
# Usage: bash slurm/cluster/start.sh [STATE_DIR]   (or set VITSCALE_SLURM_DIR)
# Env: VITSCALE_SLURM_PORT (slurmctld port, slurmd use the next two; default 16817),
#      VITSCALE_SLURM_GRACE (preemption grace seconds of `low`, default 30).
# Prints the `export SLURM_CONF=...` line that the client commands need; also in STATE/env.sh.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
source "$HERE/common.sh"

for b in munged slurmctld slurmd slurmstepd sbatch srun scontrol squeue sinfo; do
    command -v "$b" >/dev/null || { echo "error: $b not found; run slurm/cluster/install.sh as root" >&2; exit 2; }
done

# Already up (idempotent)?
if [ -s "$STATE/run/slurmctld.pid" ] && kill -0 "$(cat "$STATE/run/slurmctld.pid")" 2>/dev/null \
   && sinfo -h >/dev/null 2>&1; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
fi
bash "$HERE/stop.sh" "$STATE" >/dev/null 2>&1 || true

PORT="${VITSCALE_SLURM_PORT:-16817}"
# Another cluster on these ports would answer our clients and hide a failed start.
for p in "$PORT" $((PORT + 1)) $((PORT + 2)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        echo "error: port $p is in use (another cluster?); set VITSCALE_SLURM_PORT to a free base port" >&2
        exit 2
    fi
done
mkdir -p "$STATE"/{ctld,spool/n1,spool/n2,log,run,munge}
chmod 700 "$STATE/munge"

# munged with our own socket and a copy of the key, so nothing system-wide is touched.
install -m 400 /etc/munge/munge.key "$STATE/munge/munge.key"
munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
    --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"

# The core count from the system, not nproc: nproc obeys OMP_NUM_THREADS, which test runs set to 1.
sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_PORT@|$PORT|g" \
    -e "s|@N1_PORT@|$((PORT + 1))|g" -e "s|@N2_PORT@|$((PORT + 2))|g" \
    -e "s|@CPUS@|$(getconf _NPROCESSORS_ONLN)|g" -e "s|@GRACE@|${VITSCALE_SLURM_GRACE:-30}|g" \
    "$HERE/slurm.conf.in" > "$SLURM_CONF"
echo "export SLURM_CONF=$SLURM_CONF" > "$STATE/env.sh"

# -c: a fresh controller state each start, so old test jobs never come back.
slurmctld -c -f "$SLURM_CONF"
slurmd -N n1 -f "$SLURM_CONF"
slurmd -N n2 -f "$SLURM_CONF"

for d in slurmctld slurmd-n1 slurmd-n2; do
    for i in $(seq 25); do [ -s "$STATE/run/$d.pid" ] && break; sleep 0.2; done  # written after forking
    pid="$(cat "$STATE/run/$d.pid" 2>/dev/null || true)"
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
        echo "error: $d did not start; see $STATE/log/" >&2
        exit 1
    fi
done

# Ready when both nodes answer and are idle.
for i in $(seq 60); do
    idle="$(sinfo -h -p low -t idle -o '%D' 2>/dev/null | head -1 || true)"
    [ "$idle" = 2 ] && break
    if [ "$i" = 10 ]; then scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true; fi
    sleep 1
done
if [ "$(sinfo -h -p low -t idle -o '%D' 2>/dev/null | head -1)" != 2 ]; then
    echo "error: nodes did not come up; see $STATE/log/" >&2
    sinfo -N -l >&2 || true
    exit 1
fi
echo "export SLURM_CONF=$SLURM_CONF"
