#!/usr/bin/env bash
# Measures the relocation of a VM with a 1 GiB disk (half of it random data, the rest
# unallocated), qcow2 -> raw on virtio, under TCG, cold, precopy and live side by side (on
# one host and across hosts): total time,
# the downtime a client polling every 50 ms saw, QEMU's own downtime of a live move, bytes
# sent, with the target's disk hashed on the host every round. Two runs:
#   - on one host: two qemu providers of this process (`cargo bench --bench vm_relocation`);
#   - across hosts: two network namespaces on a bridge, their links shaped with tc tbf to
#     --rate (default 1gbit), a `fluidcloud agent` in each (`cargo bench --bench vm_hosts`);
#     bytes are those host b received on its link. Needs root; skipped without it.
# Installs the emulator and the test guest with scripts/test-env.sh first.
# Extra arguments go to both benchmarks (--disk-mib N, --rounds N, --modes cold,precopy,live);
# --rate R to the run across hosts only, --only one-host|hosts picks one run.
set -euo pipefail
cd "$(dirname "$0")/.."

rate=1gbit only="" args=("$@") pass=()
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --rate)
        rate="${args[i + 1]:-$rate}"
        i=$((i + 1))
        ;;
    --only)
        only="${args[i + 1]:-}"
        i=$((i + 1))
        ;;
    *) pass+=("${args[i]}") ;;
    esac
done

scripts/test-env.sh qemu_utils qemu_system guest
if [ "$only" != hosts ]; then
    echo "+ cargo bench --locked --bench vm_relocation -- ${pass[*]}"
    cargo bench --locked --bench vm_relocation -- "${pass[@]}"
fi
if [ "$only" != one-host ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "The run across hosts makes network namespaces and shapes links: skipped, run as root." >&2
        exit 0
    fi
    command -v tc >/dev/null || apt-get install -y iproute2 >/dev/null
    echo "+ cargo bench --locked --bench vm_hosts -- --rate $rate ${pass[*]}"
    cargo bench --locked --bench vm_hosts -- --rate "$rate" "${pass[@]}"
fi
