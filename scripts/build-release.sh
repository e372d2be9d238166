#!/usr/bin/env bash
# Builds the release `skiff` (and xtask) as one static, position-dependent binary for
# this machine and prints the directory that holds them. Static: no libc.so or ld.so in
# every shim; position-dependent: no start-up relocation of the whole binary.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -p skiff -p xtask --target "$HOST" >&2
echo "$PWD/target/$HOST/release"
