#!/usr/bin/env bash
# Runs the soak (tests/it/soak.rs) for an hour by default: the real daemon with 20 or more
# demo services on local providers, prices served over HTTP that change on a seeded
# schedule, invariants checked every second, and a restart halfway (SIGKILL here; the quick
# run in `cargo test` uses SIGTERM). Prints the soak's table: duration, services, polls,
# decisions by outcome, relocations started / completed / rolled back / failed, invariant
# violations (must be 0), restarts, RSS start / peak / end, longest relocation. Results are
# written to RELIABILITY.md's "Soak" section by hand.
#
#   scripts/soak.sh                                   # one hour, 20 services
#   FLUIDCLOUD_SOAK_SECS=600 scripts/soak.sh          # ten minutes
#   FLUIDCLOUD_SOAK_SERVICES=30 FLUIDCLOUD_SOAK_SEED=1234 scripts/soak.sh
#   FLUIDCLOUD_SOAK_SIGNAL=TERM scripts/soak.sh       # restart with SIGTERM instead
#
# The run log (violations as they happen, the restart, the table) is kept in
# $FLUIDCLOUD_SOAK_LOG (default: a temporary file, printed at the end).
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

export FLUIDCLOUD_SOAK_SECS="${FLUIDCLOUD_SOAK_SECS:-3600}"
export FLUIDCLOUD_SOAK_SERVICES="${FLUIDCLOUD_SOAK_SERVICES:-20}"
export FLUIDCLOUD_SOAK_SIGNAL="${FLUIDCLOUD_SOAK_SIGNAL:-KILL}"
log="${FLUIDCLOUD_SOAK_LOG:-$(mktemp "${TMPDIR:-/tmp}/soak.XXXXXX.log")}"

echo "soak: $FLUIDCLOUD_SOAK_SECS s, $FLUIDCLOUD_SOAK_SERVICES services, restart by SIG$FLUIDCLOUD_SOAK_SIGNAL, log $log" >&2
# The same build as scripts/test.sh (crash points compiled in), so nothing is rebuilt.
status=0
test=soak::the_daemon_keeps_its_invariants_for_a_soak_with_a_restart_in_the_middle
cargo test --locked --features crash-points --test it "$test" -- --exact --nocapture \
    >"$log" 2>&1 || status=$?
grep -E '^soak:' "$log" || true
echo
grep -E '^\|' "$log" || echo "no table: the soak did not finish, see $log" >&2
echo
if [ "$status" -eq 0 ]; then
    echo "no invariant was violated; log: $log"
else
    echo "the soak FAILED (exit $status): the violations and the seed are in $log" >&2
fi
exit "$status"
