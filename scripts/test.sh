#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the privileged integration
# tests with real runc, overlayfs, cgroups and network namespaces (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The binary without its optional WebAssembly runtime (the `wasm` feature's stub twins).
cargo clippy -p skiff --no-default-features --locked -- -D warnings
# A missing prerequisite fails the run instead of skipping privileged tests.
export SKIFF_REQUIRE_PRIVILEGED=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite.
awk '/^test result:/ {p += $4; f += $6; s += $8} END {printf "%d passed, %d failed, %d skipped\n", p, f, s}' "$log"
exit "$status"
