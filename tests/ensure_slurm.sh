#!/usr/bin/env bash
# Make a single-node Slurm installable by the tests (Debian's slurm-wlm + munge); tests/slurm_cluster.py
# starts the daemons itself, with all config and state in a temp folder.
set -euo pipefail
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
   && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  exit 0
fi
echo "note: Slurm (slurm-wlm, munge) is not installed and cannot be installed here (needs root + apt-get);" \
     "Slurm tests will be skipped (they fail instead when CI=true)." >&2
