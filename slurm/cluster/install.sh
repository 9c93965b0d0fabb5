#!/usr/bin/env bash
# Install the Debian packages of the local test cluster (slurmctld, slurmd, the client tools
# and munge) and a munge key. Run as root; safe to run again (does nothing when all is there).
# Usage: bash slurm/cluster/install.sh
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
BINARIES=(slurmctld slurmd sbatch srun scontrol squeue sacct scancel munged)

if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (it installs Debian packages: ${PACKAGES[*]})" >&2
    exit 2
fi

missing=0
for b in "${BINARIES[@]}"; do
    command -v "$b" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The packages' own services are not wanted: the cluster runs under slurm/cluster/start.sh.
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

# munged refuses to start without a key; the packages do not always create one.
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

echo "slurm test cluster packages installed: $(slurmctld -V 2>/dev/null || /usr/sbin/slurmctld -V)"
