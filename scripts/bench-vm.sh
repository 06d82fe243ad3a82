#!/usr/bin/env bash
# Measures the relocation of a VM with a 1 GiB disk (half of it random data, the rest
# unallocated) between two qemu providers, qcow2 on virtio -> raw on SATA, under TCG: total
# time and cutover downtime (VM powered down -> the target guest serves its health check),
# with the target's disk hashed on the host every round. Installs the emulator and the test
# guest with scripts/test-env.sh first. Extra arguments go to the benchmark (--disk-mib N,
# --rounds N).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-env.sh qemu_utils qemu_system guest
echo "+ cargo bench --locked --bench vm_relocation -- $*"
cargo bench --locked --bench vm_relocation -- "$@"
