#!/usr/bin/env bash
# Runs the full fault suite (tests/it/faults.rs): relocations between a real S3 and a real
# Swift with every request to either going through a fault-injecting proxy (resets, stalls,
# 503/500/429 answers, truncated bodies), and the pricing feeds behind one, then prints the
# table: runs, relocated, rolled back, inconsistent (must be 0), worst recovery time, and
# the faults injected. Then relocations between two agents' hosts (network namespaces, root)
# with the target's viaduct receiver behind a TCP proxy that resets and stalls connections in
# the middle of the volume's copy, and their table. Results are written to RELIABILITY.md's
# "Fault suite" section by hand. `cargo test` runs its quick form (4 runs between stores, 2
# between hosts with a 64 MiB volume).
#
#   scripts/faults.sh                                   # 50 + 20 runs at 20 % faults
#   FLUIDCLOUD_FAULT_HOST_RUNS=40 FLUIDCLOUD_FAULT_MIB=512 scripts/faults.sh
#   FLUIDCLOUD_FAULT_RUNS=100 FLUIDCLOUD_FAULT_RATE=0.3 scripts/faults.sh
#   FLUIDCLOUD_FAULT_SEED=1234 scripts/faults.sh        # replay a suite
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi

export FLUIDCLOUD_FAULT_RUNS="${FLUIDCLOUD_FAULT_RUNS:-50}"
export FLUIDCLOUD_FAULT_HOST_RUNS="${FLUIDCLOUD_FAULT_HOST_RUNS:-20}"
export FLUIDCLOUD_FAULT_MIB="${FLUIDCLOUD_FAULT_MIB:-128}"
export FLUIDCLOUD_FAULT_RATE="${FLUIDCLOUD_FAULT_RATE:-0.2}"
echo "fault suite: $FLUIDCLOUD_FAULT_RUNS runs between stores and $FLUIDCLOUD_FAULT_HOST_RUNS between hosts ($FLUIDCLOUD_FAULT_MIB MiB volume) at rate $FLUIDCLOUD_FAULT_RATE" >&2
cargo test --release --features crash-points --test it faults:: -- \
    --nocapture --test-threads 1
