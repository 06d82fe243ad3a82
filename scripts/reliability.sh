#!/usr/bin/env bash
# Runs the full crash suite (tests/it/crash_suite.rs): relocations of the demo service
# killed with SIGKILL at random instants and recovered by the next start of the daemon,
# then prints its tables: runs, relocated, rolled back, inconsistent (must be 0), the worst
# recovery time, and where the kills landed. Results are written to RELIABILITY.md's
# "Crash suite" section by hand.
#
#   scripts/reliability.sh                      # 50 runs with a 512 MiB volume
#   FLUIDCLOUD_CRASH_RUNS=100 FLUIDCLOUD_CRASH_MIB=1024 scripts/reliability.sh
#   FLUIDCLOUD_CRASH_SEED=1234 FLUIDCLOUD_CRASH_RUNS=1 scripts/reliability.sh   # replay a run
#
# The run log (each run's seed, process, delay, landing and outcome) is kept in
# $FLUIDCLOUD_CRASH_LOG (default: a temporary file, printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
if ! command -v qemu-img >/dev/null; then
    echo "qemu-img is required (scripts/test-env.sh installs it)" >&2
    exit 1
fi

export FLUIDCLOUD_CRASH_RUNS="${FLUIDCLOUD_CRASH_RUNS:-50}"
export FLUIDCLOUD_CRASH_MIB="${FLUIDCLOUD_CRASH_MIB:-512}"
log="${FLUIDCLOUD_CRASH_LOG:-$(mktemp "${TMPDIR:-/tmp}/crash-suite.XXXXXX.log")}"

echo "crash suite: $FLUIDCLOUD_CRASH_RUNS runs, volume $FLUIDCLOUD_CRASH_MIB MiB, log $log" >&2
# The same build as scripts/test.sh (crash points compiled in), so nothing is rebuilt.
status=0
test=crash_suite::sigkill_at_random_moments_of_relocations_ends_relocated_or_rolled_back
cargo test --locked --features crash-points --test it "$test" -- --exact --nocapture \
    >"$log" 2>&1 || status=$?
grep -E '^(crash suite:|run +[0-9]+ )' "$log" || true
echo
grep -E '^\|' "$log" || echo "no table: the suite did not finish, see $log" >&2
echo
if [ "$status" -eq 0 ]; then
    echo "every run ended relocated or rolled back; log: $log"
else
    echo "the crash suite FAILED (exit $status): inconsistent runs and their seeds are in $log" >&2
fi
exit "$status"
