#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need (idempotently,
# into .cache/ where possible), then builds and runs every test, the policy tests and the
# format and lint checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
. scripts/lib/qemu-utils.sh
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt >/dev/null 2>&1 || true

echo "== format"
cargo fmt --all -- --check
echo "== lint"
cargo clippy --all-targets --locked -- -D warnings
echo "== tests"
cargo test --locked --no-fail-fast
echo "== dashboard"
python3 dashboards/check.py
echo "== policy tests"
cargo run --quiet --locked -- policy test policies/
