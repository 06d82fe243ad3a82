#!/usr/bin/env bash
# Measures the relocation of a VM with a 1 GiB disk (half of it random data, the rest
# unallocated) between two qemu providers on this host, qcow2 -> raw on virtio, under TCG,
# cold and live side by side: total time, the downtime a client polling every 50 ms saw,
# QEMU's own downtime of a live move, bytes sent, with the target's disk hashed on the host
# every round. Installs the emulator and the test guest with scripts/test-env.sh first.
# Extra arguments go to the benchmark (--disk-mib N, --rounds N, --modes cold,live).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-env.sh qemu_utils qemu_system guest
echo "+ cargo bench --locked --bench vm_relocation -- $*"
cargo bench --locked --bench vm_relocation -- "$@"
