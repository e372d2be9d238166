# Shared helpers for bench scripts (sourced). Benchmarks compare skiff with its peers in
# one run on one machine and print ratios; they are not tests and assert nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=""
SKIFF=""
now_ns() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }
ms() { awk -v n="$1" 'BEGIN {printf "%.1f", n/1e6}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# The anonymous part of RSS (heap, stacks): what the kernel cannot drop and read back
# from the binary under memory pressure.
anon_kib() { awk '/^RssAnon:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Proportional (PSS) and private (USS) memory, from smaps_rollup.
pss_kib() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
uss_kib() { awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s + 0}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

# The release build users get (static, see scripts/build-release.sh).
# SKIFF_BENCH_BIN=DIR (holding skiff and xtask) measures that build instead, e.g. an older
# one for a before/after comparison.
build() {
  if [ -n "${SKIFF_BENCH_BIN:-}" ]; then
    BIN=$SKIFF_BENCH_BIN
  else
    BIN=$("$ROOT/scripts/build-release.sh" 2>/dev/null)
  fi
  SKIFF="$BIN/skiff"
}

# start_up DATA [ARGS...]: runs `skiff up ARGS` on its own bridge/subnet; sets UP_PID.
start_up() {
  local data=$1
  shift
  mkdir -p "$data"
  "$BIN/xtask" demo-image "$data/layout" >/dev/null
  "$SKIFF" --data "$data" image load "$data/layout" >/dev/null 2>&1
  # A developer's RUST_BACKTRACE makes every error capture a backtrace, which reads the
  # whole unwind table into memory: measure what a node runs, without it.
  env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE \
    "$SKIFF" --data "$data" up --listen 127.0.0.1:0 --bridge skbench0 --subnet 10.250.0.0/24 "$@" >"$data/up.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 1 100); do
    [ -f "$data/admin.conf" ] && "$SKIFF" --data "$data" get nodes >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "skiff up did not start: $(cat "$data/up.log")" >&2
  return 1
}

# stop_up DATA: deletes every deployment, waits for their instances to go, then Ctrl-C.
stop_up() {
  local data=$1
  for d in $("$SKIFF" --data "$data" get deployments -o json 2>/dev/null | grep -o '"name": "[^"]*"' | cut -d'"' -f4 | sort -u); do
    "$SKIFF" --data "$data" delete deployment "$d" >/dev/null 2>&1 || true
  done
  for _ in $(seq 1 600); do
    [ "$("$SKIFF" --data "$data" get instances -o json 2>/dev/null | tr -d ' \n')" = "[]" ] && break
    sleep 0.1
  done
  kill -INT "$UP_PID" 2>/dev/null || true
  for _ in $(seq 1 600); do kill -0 "$UP_PID" 2>/dev/null || break; sleep 0.1; done
  ip link del skbench0 2>/dev/null || true
}

# A private Docker engine for a bench: Debian's docker.io (installed when missing), its own
# socket and data root under DIR, no bridge, no iptables changes. Sets D (the docker
# command) and DOCKERD_PID; stop_docker DIR stops it and removes its containers.
DOCKERD_PID=""
D=""
start_docker() {
  local dir=$1
  if ! command -v dockerd >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  mkdir -p "$dir"
  dockerd --data-root "$dir/root" --exec-root "$dir/exec" --pidfile "$dir/pid" -H "unix://$dir/sock" \
    --bridge none --iptables=false --ip6tables=false --ip-masq=false --log-level error >"$dir/log" 2>&1 &
  DOCKERD_PID=$!
  D="docker -H unix://$dir/sock"
  for _ in $(seq 1 300); do $D info >/dev/null 2>&1 && break; sleep 0.1; done
  if ! $D info >/dev/null 2>&1; then
    echo "dockerd did not start: $(tail -3 "$dir/log")" >&2
    return 1
  fi
  "$BIN/xtask" demo-image-tar "$dir/demo.tar" >/dev/null
  $D load -i "$dir/demo.tar" >/dev/null
}
stop_docker() {
  local dir=$1
  [ -n "$DOCKERD_PID" ] || return 0
  $D rm -f $($D ps -aq) >/dev/null 2>&1 || true
  kill "$DOCKERD_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
  umount -R "$dir/root" "$dir/exec" 2>/dev/null || true
  DOCKERD_PID=""
}
