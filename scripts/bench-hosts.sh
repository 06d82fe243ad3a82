#!/usr/bin/env bash
# Benchmarks moving a volume between two hosts: two network namespaces on a bridge, their
# links shaped with a token bucket (tbf) to each rate of --rate (default 1gbit,100mbit), a
# real `fluidcloud agent` in each. A's agent sends a 4 GiB raw image with 1.5 GiB allocated
# to B's with the viaduct, against `dd bs=1M | nc`, `rsync --sparse` (and `-z`) to an rsync
# daemon, and `zstd -1 -T0 | nc`; then 1 % of the image changes and the viaduct sends again.
# Prints a table per rate: seconds, bytes on the wire (B's veth counters, headers included),
# the viaduct's floor (its wire bytes at the link rate) and the targets. Then the cutover: a
# service (the demo app and a volume of the same size) relocated from A's agent to B's by the
# relocation engine with pre-copy, 1 % of the volume changed before the cutover; its total,
# pre-copy, downtime and final delta.
#
# Needs root (namespaces, veth, tc). Extra arguments go to the benchmark, e.g.
#   scripts/bench-hosts.sh --size-gib 1 --allocated-gib 0.4          (a quick run)
#   scripts/bench-hosts.sh --size-gib 4,1 --allocated-gib 1.5,0.4    (smaller at 100 Mbit/s)
#   scripts/bench-hosts.sh --rate 1gbit --only cutover              (the cutover alone)
#   --streams N, --repeat N, --only viaduct,dd,rsync,rsync-z,zstd,cutover, --dir DIR
# The hosts' files live in a temporary directory under --dir (default /dev/shm, a tmpfs);
# it, the namespaces and every process in them are removed on exit, also after Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "This benchmark makes network namespaces and shapes links: run it as root." >&2
    exit 1
fi

need=()
command -v nc >/dev/null || need+=(netcat-openbsd)
command -v rsync >/dev/null || need+=(rsync)
command -v zstd >/dev/null || need+=(zstd)
command -v tc >/dev/null || need+=(iproute2)
if ((${#need[@]})); then
    echo "Installing ${need[*]} ..." >&2
    apt-get install -y "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null; }
fi
# The local provider makes its volumes with qemu-img.
. scripts/lib/qemu-utils.sh

# The namespaces, bridge and links are named after this tag, so that the trap can remove
# them even when the benchmark was killed before it could.
tag="hb$(printf '%05x' $(($$ & 0xfffff)))"
dir=/dev/shm
[ -d "$dir" ] || dir="${TMPDIR:-/tmp}"
size_gib=4 allocated_gib=1.5
args=("$@") pass=()
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
    --dir)
        dir="${args[i + 1]:-$dir}"
        i=$((i + 1))
        continue
        ;;
    --size-gib) size_gib="${args[i + 1]:-$size_gib}" ;;
    --allocated-gib) allocated_gib="${args[i + 1]:-$allocated_gib}" ;;
    esac
    pass+=("${args[i]}")
done
work="$(mktemp -d "$dir/hosts-bench-run.XXXXXX")"

cleanup() {
    for ns in "${tag}a" "${tag}b"; do
        if [ -e "/run/netns/$ns" ]; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    for link in "${tag}va" "${tag}vb" "${tag}br"; do
        ip link del "$link" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The peak: the source's data, a `dd | nc` copy as large as the image (nc writes every
# zero) and the viaduct's previous copy while the next one is staged beside it.
max() { tr ',' '\n' <<<"$1" | sort -g | tail -1; }
need_kib="$(awk -v s="$(max "$size_gib")" -v a="$(max "$allocated_gib")" \
    'BEGIN {printf "%d", (s + 3 * a + 0.5) * 1048576}')"
free_kib="$(df -Pk "$work" | awk 'NR==2 {print $4}')"
if [ "$free_kib" -lt "$need_kib" ]; then
    echo "Need about $((need_kib / 1048576)) GiB free under $work; $((free_kib / 1048576)) GiB are free." >&2
    exit 1
fi
# The benchmark builds the release `fluidcloud` it starts as the agents; the cutover's
# service runs the release demo app.
cargo build --release --example demo-app
cargo bench --bench hosts -- --dir "$work" --tag "$tag" ${pass[@]+"${pass[@]}"}
