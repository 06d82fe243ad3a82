#!/usr/bin/env bash
# Runs every full reliability suite, one after the other, and prints their tables at the
# end (RELIABILITY.md holds them, with what each one checks):
#
#   flapping  the feed scenarios replayed through the real broker in simulated time
#             (`cargo test --test it flapping::`), relocations and suppressions by reason
#   crash     scripts/reliability.sh: 50 relocations killed at random instants (daemon, and
#             agents between hosts), recovered; relocated / rolled back / inconsistent
#   faults    scripts/faults.sh: 50 relocations through the fault-injecting proxy at 20 %
#   soak      scripts/soak.sh: the daemon for an hour with 20 services, invariants
#   fuzz      scripts/fuzz.sh: every fuzz target for FLUIDCLOUD_FUZZ_SECS (default 300) each
#
#   scripts/suites.sh                       # all of them: about two hours here
#   SUITES="crash faults" scripts/suites.sh # some
#
# The scripts' own variables size each suite (FLUIDCLOUD_CRASH_RUNS, FLUIDCLOUD_FAULT_RUNS,
# FLUIDCLOUD_SOAK_SECS, ...). Exit status: 0 when every suite passed. Each suite's full
# output is kept under $FLUIDCLOUD_SUITES_LOG (default: a temporary directory, printed).
set -uo pipefail
cd "$(dirname "$0")/.."

suites=${SUITES:-flapping crash faults soak fuzz}
logs="${FLUIDCLOUD_SUITES_LOG:-$(mktemp -d "${TMPDIR:-/tmp}/suites.XXXXXX")}"
mkdir -p "$logs"
scripts/test-env.sh >/dev/null

declare -A status
for suite in $suites; do
    log="$logs/$suite.log"
    echo "== $suite (log $log)" >&2
    started=$(date +%s)
    case "$suite" in
    flapping)
        cargo test --locked --features crash-points --test it flapping:: -- --nocapture \
            --test-threads 1 >"$log" 2>&1
        ;;
    crash) scripts/reliability.sh >"$log" 2>&1 ;;
    faults) scripts/faults.sh >"$log" 2>&1 ;;
    soak) scripts/soak.sh >"$log" 2>&1 ;;
    fuzz) scripts/fuzz.sh "${FLUIDCLOUD_FUZZ_SECS:-300}" >"$log" 2>&1 ;;
    *)
        echo "unknown suite \`$suite\` (flapping, crash, faults, soak, fuzz)" >&2
        exit 2
        ;;
    esac
    rc=$?
    status[$suite]=$rc
    echo "   $suite: exit $rc after $(($(date +%s) - started)) s" >&2
done

failed=0
for suite in $suites; do
    echo
    echo "## $suite: $([ "${status[$suite]}" -eq 0 ] && echo passed || echo "FAILED (exit ${status[$suite]})")"
    echo
    # Every suite prints its results as Markdown tables.
    grep -E '^\|' "$logs/$suite.log" || echo "(no table: see $logs/$suite.log)"
    [ "${status[$suite]}" -eq 0 ] || failed=1
done
echo
echo "logs: $logs"
exit "$failed"
