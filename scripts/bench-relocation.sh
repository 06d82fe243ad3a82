#!/usr/bin/env bash
# Measures the cutover downtime of a pre-copy relocation: a service with the demo app, its
# configuration file and a 4 GiB volume (1.5 GiB allocated) moves between two local
# providers, raw -> raw and raw -> qcow2, run by the relocation engine; 1% of the volume
# changes between the pre-copy and the cutover. Prints each round and the medians.
# Extra arguments go to the benchmark (--size-gib, --allocated-gib, --repeat, --targets
# raw,qcow2, --change-percent). Everything lives in a temporary directory removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v qemu-img >/dev/null; then
    echo "Installing qemu-utils ..." >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y qemu-utils >/dev/null 2>&1 ||
        { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y qemu-utils >/dev/null; }
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/relocation-bench-run.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM
# A round holds the built image, the source, the target (and for qcow2 a staging copy and
# the converted image) and the expected image it is compared with.
free_kib="$(df -Pk "$work" | awk 'NR==2 {print $4}')"
if [ "$free_kib" -lt $((12 * 1048576)) ]; then
    echo "Need about 12 GiB free under $work; $((free_kib / 1048576)) GiB are free." >&2
    exit 1
fi
cargo build --locked --release --example demo-app
echo "+ cargo bench --locked --bench relocation -- --dir $work $*"
cargo bench --locked --bench relocation -- --dir "$work" "$@"
