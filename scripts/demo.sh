#!/usr/bin/env bash
# The demo: install what is needed, build skiff, build the demo image from Debian's
# busybox-static (no registry needed), and run the demo stack with `skiff up`.
# Ctrl-C stops the stack. From a second terminal: target/skiff get instances
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
BIN=$(scripts/build-release.sh)
ln -sf "$BIN/skiff" target/skiff
"$BIN/xtask" demo-image target/demo-image
"$BIN/xtask" wasm-programs target/wasm   # WASI programs for the tour (hello.wasm, http.wasm, ...)
target/skiff image load target/demo-image
exec target/skiff up -f examples/demo/compose.yaml "$@"
