#!/usr/bin/env bash
# Runs the full crash suites and prints their tables: relocations of the demo service killed
# with SIGKILL at random instants and recovered, first the daemon suite
# (tests/it/crash_suite.rs: the daemon or `fluidcloud relocate` killed, between two local
# providers), then the agents suite (tests/it/crash_agents.rs: an agent killed, or the daemon
# and an agent, in a relocation between two hosts; needs root for its network namespaces).
# Each table: runs, relocated, rolled back, inconsistent (must be 0), the worst recovery time,
# and where the kills landed. Results are written to RELIABILITY.md's "Crash suite" section
# by hand.
#
#   scripts/reliability.sh                      # 50 + 50 runs with a 512 MiB volume
#   FLUIDCLOUD_CRASH_RUNS=100 FLUIDCLOUD_CRASH_MIB=1024 scripts/reliability.sh
#   FLUIDCLOUD_CRASH_AGENT_RUNS=20 scripts/reliability.sh   # 20 runs of the agents suite
#   FLUIDCLOUD_CRASH_SEED=1234 FLUIDCLOUD_CRASH_RUNS=1 scripts/reliability.sh   # replay a run
#
# The run logs (each run's seed, process, delay, landing and outcome) are kept in
# $FLUIDCLOUD_CRASH_LOG and $FLUIDCLOUD_CRASH_AGENT_LOG (default: temporary files, printed at
# the end).
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
export FLUIDCLOUD_CRASH_AGENT_RUNS="${FLUIDCLOUD_CRASH_AGENT_RUNS:-50}"
export FLUIDCLOUD_CRASH_MIB="${FLUIDCLOUD_CRASH_MIB:-512}"
log="${FLUIDCLOUD_CRASH_LOG:-$(mktemp "${TMPDIR:-/tmp}/crash-suite.XXXXXX.log")}"
agent_log="${FLUIDCLOUD_CRASH_AGENT_LOG:-$(mktemp "${TMPDIR:-/tmp}/crash-agents.XXXXXX.log")}"

# Runs one suite (its test, its log, its title); prints its runs and tables; returns its exit
# status. The same build as scripts/test.sh (crash points compiled in), so nothing is rebuilt.
suite() {
    local test="$1" log="$2" title="$3" status=0
    cargo test --locked --features crash-points --test it "$test" -- --exact --nocapture \
        >"$log" 2>&1 || status=$?
    grep -E '^(crash suite|run +[0-9]+ |SKIPPED)' "$log" || true
    echo
    grep -E '^\|' "$log" || echo "no table: the $title did not finish, see $log" >&2
    echo
    if [ "$status" -eq 0 ]; then
        echo "$title: every run ended relocated or rolled back; log: $log"
    else
        echo "the $title FAILED (exit $status): inconsistent runs and their seeds are in $log" >&2
    fi
    return "$status"
}

echo "crash suite: $FLUIDCLOUD_CRASH_RUNS runs, volume $FLUIDCLOUD_CRASH_MIB MiB, log $log" >&2
status=0
suite crash_suite::sigkill_at_random_moments_of_relocations_ends_relocated_or_rolled_back \
    "$log" "crash suite" || status=$?
echo
echo "crash suite with agents: $FLUIDCLOUD_CRASH_AGENT_RUNS runs, volume" \
    "$FLUIDCLOUD_CRASH_MIB MiB, log $agent_log" >&2
suite crash_agents::sigkill_of_agents_at_random_moments_of_relocations_across_hosts_ends_relocated_or_rolled_back \
    "$agent_log" "crash suite with agents" || status=$?
exit "$status"
