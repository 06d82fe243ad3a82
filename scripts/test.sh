#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (idempotently:
# qemu-utils system-wide, the S3, Swift and QEMU test servers and Prometheus into a cache
# directory, see scripts/test-env.sh), then builds and runs every test with the crash
# tests' kill switch compiled in, the alert rules' unit tests, the policy tests and the
# format and lint checks of the default and the full build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
scripts/test-env.sh
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true

# The checkpoints the crash tests kill the process at.
FEATURES=crash-points

echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --all-targets --locked -- -D warnings
cargo clippy --all-targets --locked --features "$FEATURES" -- -D warnings
echo "== tests"
cargo test --locked --no-fail-fast --features "$FEATURES"
echo "== alert rules"
# The dashboards' queries run against a real Prometheus in `cargo test` (tests/it/prometheus.rs,
# which also runs these two); here the rules are checked without building anything.
PROMTOOL=${FLUIDCLOUD_PROMTOOL:-$(sed -n 's/^FLUIDCLOUD_PROMTOOL=//p' \
    "${FLUIDCLOUD_TEST_ENV:-$HOME/.cache/fluidcloud-test-env}/env")}
"$PROMTOOL" check rules dashboards/alerts.yml
"$PROMTOOL" test rules dashboards/alerts_test.yml
echo "== policy tests"
cargo run --quiet --locked --features "$FEATURES" -- policy test policies/
