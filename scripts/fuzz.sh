#!/usr/bin/env bash
# Fuzzes every target of tests/fuzz for SECONDS each (default 60), one process at a time,
# and prints a table: target, inputs run, corpus size, crashes. Needs nightly Rust
# (rustup) and cargo-fuzz (installed here when missing). New inputs go to a scratch corpus
# under the target directory, seeded from tests/fuzz/corpus/<target>/; an input that
# crashes a target is saved under tests/fuzz/artifacts/<target>/ (see the README for how
# it becomes a corpus file and a fix). Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_TARGET=${1:-60}
shift || true
FUZZ_DIR=tests/fuzz
TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/fuzz}
SCRATCH=$TARGET_DIR/corpus
# Limits per input: a run longer than this is a hang, more memory than this a leak.
LIMITS=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024)

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzzing needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir "$FUZZ_DIR")
fi

cargo +nightly fuzz build --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR" --debug-assertions

rows=()
failed=0
for target in "${targets[@]}"; do
    mkdir -p "$SCRATCH/$target" "$FUZZ_DIR/artifacts/$target"
    log=$TARGET_DIR/$target.log
    before=$(find "$FUZZ_DIR/artifacts/$target" -type f | wc -l)
    echo "== $target (${SECONDS_PER_TARGET} s)"
    status=0
    cargo +nightly fuzz run --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR" --debug-assertions \
        "$target" "$SCRATCH/$target" "$FUZZ_DIR/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" "${LIMITS[@]}" -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    corpus=$(( $(find "$SCRATCH/$target" -type f | wc -l) + $(find "$FUZZ_DIR/corpus/$target" -type f | wc -l) ))
    crashes=$(( $(find "$FUZZ_DIR/artifacts/$target" -type f | wc -l) - before ))
    if [ "$status" -ne 0 ]; then
        failed=1
        grep -m 3 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" || tail -n 5 "$log"
    fi
    rows+=("$(printf '| %-16s | %12s | %8s | %8s |' "$target" "${runs:-?}" "$corpus" "$crashes")")
done

printf '\n| %-16s | %12s | %8s | %8s |\n' target runs corpus crashes
printf '| --- | ---: | ---: | ---: |\n'
printf '%s\n' "${rows[@]}"
exit $failed
