#!/usr/bin/env bash
# Runs every benchmark and prints its figures. Release builds; takes several minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== policy evaluation (10,000 services x 100 offers, one core)"
cargo bench --locked --bench policy_eval
echo "== AWS offer file parsing"
cargo bench --locked --bench aws_offer_parse
echo "== idle daemon"
scripts/bench-idle.sh "${IDLE_WINDOW_SECS:-180}"
echo "== relocation cutover downtime (pre-copy, 4 GiB volume)"
scripts/bench-relocation.sh
echo "== bucket relocation s3s-fs -> Swift against rclone"
scripts/bench-buckets.sh
echo "== viaduct against dd|nc, cp and rsync (4 GiB image)"
scripts/bench-viaduct.sh
echo "== VM relocation between qemu providers (1 GiB disk)"
scripts/bench-vm.sh
