#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and the privileged integration
# tests with real runc, overlayfs, cgroups and network namespaces (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A missing prerequisite fails the run instead of skipping privileged tests.
export SKIFF_REQUIRE_PRIVILEGED=1
cargo test --workspace --all-targets --locked
