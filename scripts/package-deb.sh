#!/usr/bin/env bash
# Builds skiff's .deb: the binary, the systemd units (packaging/systemd), man pages and
# shell completions generated from the command line. Prints the package's path.
#
#   scripts/package-deb.sh                       # this machine's architecture, release build
#   scripts/package-deb.sh aarch64-unknown-linux-gnu    # arm64 (see "Cross-compiling" below)
#   scripts/package-deb.sh armv7-unknown-linux-gnueabihf # armhf
#   SKIFF_BIN=path/to/skiff scripts/package-deb.sh      # package a binary built already
#   SKIFF_BIN=arm64/skiff SKIFF_TOOL=target/debug/skiff scripts/package-deb.sh aarch64-unknown-linux-gnu
#                                  # a foreign binary built already; this machine's makes the docs
#
# Cross-compiling: `rustup target add TRIPLE`, and a C cross compiler for ring and
# SQLite (Debian: gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf); this script sets the
# linker and compiler for those two. Man pages and completions are made by the binary
# of this machine's build (a foreign binary cannot run here), which has the same
# command line.
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=$(rustc -vV | sed -n 's/^host: //p')
TARGET=${1:-$HOST}
CC_PREFIX=
case "$TARGET" in
  x86_64-unknown-linux-gnu) ARCH=amd64; CC_PREFIX=x86_64-linux-gnu ;;
  aarch64-unknown-linux-gnu) ARCH=arm64; CC_PREFIX=aarch64-linux-gnu ;;
  armv7-unknown-linux-gnueabihf) ARCH=armhf; CC_PREFIX=arm-linux-gnueabihf ;;
  *) echo "package-deb: no Debian architecture known for $TARGET" >&2; exit 2 ;;
esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ -n "${SKIFF_BIN:-}" ]; then
  BIN=$SKIFF_BIN
  TOOL=${SKIFF_TOOL:-$SKIFF_BIN}
else
  if [ "$TARGET" != "$HOST" ]; then
    ENV_TARGET=$(echo "$TARGET" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${ENV_TARGET}_LINKER=${CC_PREFIX}-gcc"
    export "CC_$(echo "$TARGET" | tr '-' '_')=${CC_PREFIX}-gcc"
    # Static, as build-release.sh builds for this machine: no libc version to depend on.
    # Not for armhf: a static glibc binary for armv7 crashes at its start (seen under
    # qemu-arm; the dynamic one runs), so that package depends on libc6 instead.
    FLAGS="-C target-feature=+crt-static -C relocation-model=static"
    [ "$ARCH" = armhf ] && FLAGS=
    RUSTFLAGS="$FLAGS" cargo build --release --locked -p skiff --target "$TARGET" >&2
    BIN=target/$TARGET/release/skiff
    TOOL=${SKIFF_TOOL:-$(scripts/build-release.sh)/skiff}
  else
    BIN=$(scripts/build-release.sh)/skiff
    TOOL=$BIN
  fi
fi
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
install -D -m 0755 "$BIN" "$STAGE/usr/bin/skiff"
# A debug build carries its symbols: not in a package.
strip --strip-debug "$STAGE/usr/bin/skiff" 2>/dev/null || true
for unit in packaging/systemd/*.service; do
  install -D -m 0644 "$unit" "$STAGE/lib/systemd/system/$(basename "$unit")"
done
"$TOOL" man "$STAGE/usr/share/man/man1" >/dev/null
gzip -9n "$STAGE"/usr/share/man/man1/*.1
install -d "$STAGE/usr/share/bash-completion/completions" "$STAGE/usr/share/zsh/vendor-completions" \
  "$STAGE/usr/share/fish/vendor_completions.d" "$STAGE/usr/share/doc/skiff"
"$TOOL" completion bash >"$STAGE/usr/share/bash-completion/completions/skiff"
"$TOOL" completion zsh >"$STAGE/usr/share/zsh/vendor-completions/_skiff"
"$TOOL" completion fish >"$STAGE/usr/share/fish/vendor_completions.d/skiff.fish"
printf 'skiff\nLicense: Apache-2.0\n' >"$STAGE/usr/share/doc/skiff/copyright"
mkdir -p "$STAGE/DEBIAN"
# A dynamically linked binary needs a glibc at least as new as the newest symbol it uses.
LIBC_DEPENDS=
if readelf -d "$BIN" | grep -q NEEDED; then
  GLIBC=$(readelf --dyn-syms -W "$BIN" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
  LIBC_DEPENDS="libc6 (>= ${GLIBC:-2.17}), "
fi
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: skiff
Version: $VERSION
Architecture: $ARCH
Maintainer: skiff developers <skiff@localhost>
Installed-Size: $SIZE
Depends: ${LIBC_DEPENDS}runc
Recommends: nftables | iptables
Suggests: runsc
Section: admin
Priority: optional
Description: run containers on fleets of small edge devices
 One binary: the agent that runs a node's containers under runc, the hub that
 manages a fleet of them, and the command line. Units: skiff-agent, skiff-hub
 and skiff-up (configured by skiff install or /etc/default/skiff-ROLE).
CONTROL
# Units are not started by the package: a node needs its hub and token first
# (`skiff install agent -- --hub ... --token-file ...`).
cat >"$STAGE/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
POSTINST
# An upgrade restarts the services that run (KillMode=process: their containers run on).
cat >>"$STAGE/DEBIAN/postinst" <<'POSTINST'
if [ "$1" = configure ] && [ -n "$2" ] && [ -d /run/systemd/system ]; then
  for u in skiff-agent skiff-hub skiff-up; do
    systemctl try-restart "$u.service" >/dev/null 2>&1 || true
  done
fi
POSTINST
# Removal stops and disables the services first (their containers keep running until
# the node is cleaned up: `skiff delete` before removing the package stops them).
cat >"$STAGE/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  for u in skiff-agent skiff-hub skiff-up; do
    systemctl disable --now "$u.service" >/dev/null 2>&1 || true
  done
fi
PRERM
cat >"$STAGE/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
POSTRM
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
OUT=${OUT_DIR:-target/deb}
mkdir -p "$OUT"
DEB="$OUT/skiff_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$STAGE" "$DEB" >&2
realpath "$DEB"
