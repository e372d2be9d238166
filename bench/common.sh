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
# Proportional (PSS) and private (USS) memory, from smaps_rollup.
pss_kib() { awk '/^Pss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
uss_kib() { awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s + 0}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
have_docker() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

# The release build users get (static, see scripts/build-release.sh).
build() {
  BIN=$("$ROOT/scripts/build-release.sh" 2>/dev/null)
  SKIFF="$BIN/skiff"
}

# start_up DATA [ARGS...]: runs `skiff up ARGS` on its own bridge/subnet; sets UP_PID.
start_up() {
  local data=$1
  shift
  mkdir -p "$data"
  "$BIN/xtask" demo-image "$data/layout" >/dev/null
  "$SKIFF" --data "$data" image load "$data/layout" >/dev/null 2>&1
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
