#!/usr/bin/env bash
# The demo: install what is needed, build skiff, build the demo image from Debian's
# busybox-static (no registry needed), and run the demo stack with `skiff up`.
# Ctrl-C stops the stack. From a second terminal: target/release/skiff get instances
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo build --release --locked -p skiff -p xtask
target/release/xtask demo-image target/demo-image
target/release/skiff image load target/demo-image
exec target/release/skiff up -f examples/demo/compose.yaml "$@"
