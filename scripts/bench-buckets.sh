#!/usr/bin/env bash
# Compares the bucket migrator with `rclone copy` from an s3s-fs bucket to a Swift container
# (both servers on loopback, started by the benchmark): 1,000 objects of 64 KiB and 4 of
# 256 MiB, interleaved rounds, seconds, MB/s and the ratio. Installs the servers with
# scripts/test-env.sh and rclone with apt when they are missing.
# Extra arguments go to the benchmark (--repeat N, --sets small,large, --rclone PATH).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rclone >/dev/null; then
    echo "Installing rclone ..." >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y rclone >/dev/null 2>&1 ||
        { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y rclone >/dev/null; }
fi
scripts/test-env.sh s3s_fs swift memcached >/dev/null

work="$(mktemp -d "${TMPDIR:-/tmp}/buckets-bench-run.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM
# The source bucket (1 GiB) and 2 x repeat + 1 copies of it in Swift.
free_kib="$(df -Pk "$work" | awk 'NR==2 {print $4}')"
if [ "$free_kib" -lt $((10 * 1048576)) ]; then
    echo "Need about 10 GiB free under $work; $((free_kib / 1048576)) GiB are free." >&2
    exit 1
fi
echo "+ cargo bench --locked --bench buckets -- --dir $work $*"
cargo bench --locked --bench buckets -- --dir "$work" "$@"
