#!/usr/bin/env bash
# Benchmarks the viaduct against the paper's `dd | nc`, `cp --sparse=always` and
# `rsync --sparse` on a 4 GiB raw image with 1.5 GiB allocated, and prints a table.
# Extra arguments go to the benchmark (--size-gib, --allocated-gib, --streams).
# The image and its copies live in a temporary directory that is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v nc >/dev/null || need+=(netcat-openbsd)
command -v rsync >/dev/null || need+=(rsync)
if ((${#need[@]})); then
    echo "Installing ${need[*]} ..." >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get install -y "${need[@]}" >/dev/null 2>&1 ||
        { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y "${need[@]}" >/dev/null; }
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/viaduct-bench-run.XXXXXX")"
trap 'rm -rf "$work"' EXIT INT TERM
free_kib="$(df -Pk "$work" | awk 'NR==2 {print $4}')"
if [ "$free_kib" -lt $((12 * 1024 * 1024)) ]; then
    echo "Need about 12 GiB free under $work; $((free_kib / 1024 / 1024)) GiB are free." >&2
    exit 1
fi
cargo bench --bench viaduct -- --dir "$work" "$@"
