#!/usr/bin/env bash
# Benchmarks the viaduct against the paper's `dd | nc`, `cp --sparse=always` and
# `rsync --sparse` on a 4 GiB raw image with 1.5 GiB allocated, and prints a table, the
# bytes a re-sync sends after 1% changed, and the final delta pass of a pre-copy (the
# viaduct's share of a cutover's downtime). Every method starts with the source image in
# the page cache (it is read once before each run) and none of the copies cached.
# Extra arguments go to the benchmark (--size-gib, --allocated-gib, --streams, --repeat,
# --only viaduct,cp,cutover ...).
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
# The peak is the `dd | nc` copy (as large as the image: nc writes every zero) while the
# image, the viaduct's received copy and a scratch file as large as the image's data exist.
size_gib=4 allocated_gib=1.5
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --size-gib) size_gib="${args[i + 1]:-$size_gib}" ;;
    --allocated-gib) allocated_gib="${args[i + 1]:-$allocated_gib}" ;;
    esac
done
need_kib="$(awk -v s="$size_gib" -v a="$allocated_gib" 'BEGIN {printf "%d", (s + 3 * a + 0.5) * 1048576}')"
free_kib="$(df -Pk "$work" | awk 'NR==2 {print $4}')"
if [ "$free_kib" -lt "$need_kib" ]; then
    echo "Need about $((need_kib / 1048576)) GiB free under $work; $((free_kib / 1048576)) GiB are free." >&2
    exit 1
fi
cargo bench --bench viaduct -- --dir "$work" "$@"
