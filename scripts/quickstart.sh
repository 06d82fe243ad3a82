#!/usr/bin/env bash
# Runs the daemon on the quickstart on a fresh machine: installs qemu-img if it is missing,
# builds the daemon and the demo app (release), and starts the daemon in the foreground.
# Within a minute it relocates the `shop` service from home-virginia to home-frankfurt.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "cargo is required (https://rustup.rs)" >&2
    exit 1
fi
. scripts/lib/qemu-utils.sh
echo "== building the daemon and the demo app"
cargo build --release --locked --bin fluidcloud --example demo-app
exec target/release/fluidcloud daemon --config examples/quickstart/fluidcloud.toml "$@"
