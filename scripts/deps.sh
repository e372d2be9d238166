#!/usr/bin/env bash
# Installs the system packages skiff needs, from Debian's archive. Idempotent; needs root.
set -euo pipefail
# gcc and libc6-dev build the static probes the security tests run inside containers;
# runsc (gVisor) is the sandboxed runtime class. tini: its static build is the `--init` of
# a skiff binary that is not static itself (a debug build; releases are their own init).
# buildah: builds the images of compose services that have a `build:` section; git fetches
# a build context given as a Git URL (and its daemon serves one to the tests).
# docker.io: the tests start a Docker daemon of their own (a LAN host pulling through a
# site cache); its service is kept from starting at install (it would set the host's
# FORWARD policy to DROP), see below.
# etcd-server: the hub's store for several hubs (its service is kept from starting too);
# protobuf-compiler and libprotobuf-dev (its well-known types): the etcd client's build
# compiles etcd's protocol files.
# systemd (systemd-analyze checks the units; it need not be the running init), dpkg-dev
# and binutils: the .deb is built, checked and installed by the tests.
PACKAGES=(runc runsc busybox-static tini buildah git iproute2 nftables iptables util-linux ca-certificates docker-registry skopeo gcc libc6-dev docker.io etcd-server protobuf-compiler libprotobuf-dev systemd dpkg-dev binutils "$@")
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  echo "scripts/deps.sh: run as root (containers, cgroups and network namespaces need it)" >&2
  exit 1
fi
apt-get update -qq
# No service starts during the install (invoke-rc.d asks policy-rc.d; 101: not allowed).
NO_START=/usr/sbin/policy-rc.d
if [ ! -e "$NO_START" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$NO_START" && chmod +x "$NO_START"
  trap 'rm -f "$NO_START"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: installing Debian's Rust toolchain (a newer rustup toolchain works too)" >&2
  apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
fi
modprobe overlay 2>/dev/null || true
mkdir -p /var/run/netns
