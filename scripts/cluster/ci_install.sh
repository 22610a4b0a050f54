#!/usr/bin/env bash
# ci_install.sh — install the Debian packages the cluster tests use, quietly and only
# when missing (a second run does nothing). Root only; without root it says so and
# exits 0, and the tests that need these packages skip with the reason.
#
#   bash scripts/cluster/ci_install.sh        # from .ci/run, before pytest
#
# munge slurmctld slurmd slurm-client: a real single-node (or netns multi-node) Slurm
#                                      for tests/test_slurm.py (started by slurm_local_up.sh)
# iproute2:                            ip netns, veth, bridge, tc (rate limits) for tests/test_cluster_netns.py
# openmpi-bin:                         mpirun for tests/test_mpi.py
# nftables:                            nft, for packet loss on a namespace link (tests/test_packet_loss.py)
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "ci_install.sh: not root; cluster tests will skip" >&2; exit 0
fi
need=()
command -v munged    >/dev/null 2>&1 || need+=(munge)
command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
command -v slurmd    >/dev/null 2>&1 || need+=(slurmd)
command -v sbatch    >/dev/null 2>&1 || need+=(slurm-client)
command -v tc        >/dev/null 2>&1 || need+=(iproute2)
command -v mpirun    >/dev/null 2>&1 || need+=(openmpi-bin)
command -v nft       >/dev/null 2>&1 || need+=(nftables)
[ ${#need[@]} -eq 0 ] && exit 0
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# the packages' postinst scripts try to start services; without systemd that is a no-op:
# the tests start and stop the daemons themselves
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "ci_install.sh: installed ${need[*]}" >&2
