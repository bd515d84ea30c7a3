#!/usr/bin/env bash
# Instructions per proxied call: a Keel gateway under callgrind forwards N unary ModelInfer
# calls (the e2e harness's stored `simple` request, h2load, one connection, 8 streams) to a
# Keel on its embedded backend, after a warm-up. Instruction counts do not move with the
# machine's load, so a change of 1% shows, where CPU time on a shared machine varies by
# 20% between rounds (benches/e2e.sh). It counts user-space instructions only: syscalls
# (`strace -c`) and what the kernel spends on them are not in it.
#
#   benches/instructions.sh                     # this tree's release build, N=2000
#   N=5000 benches/instructions.sh
#   benches/instructions.sh /path/to/other/keel # another build (an A/B: run both)
#
# Needs valgrind and h2load (Debian's valgrind and nghttp2-client; installed when run as
# root). Everything listens on 127.0.0.1 on ports the OS picks and is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
WARM=${WARM:-500}
say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'instructions.sh: %s\n' "$*" >&2
  exit 1
}

for need in valgrind:valgrind h2load:nghttp2-client; do
  cmd=${need%%:*} pkg=${need##*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    say "installing Debian's $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null 2>&1 || true
  fi
  command -v "$cmd" >/dev/null 2>&1 || die "$cmd is missing (Debian's $pkg)"
done

if [ -n "${1:-}" ]; then
  KEEL=$1
else
  say "building keel (release)"
  cargo build --release --quiet
  KEEL=${CARGO_TARGET_DIR:-$PWD/target}/release/keel
fi
# shellcheck source=benches/e2e/procs.sh
source benches/e2e/procs.sh

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { # bounded: valgrind starts slowly
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listens on 127.0.0.1:$1 after 60s"
}

LIMITS=$(cat benches/e2e/limits.toml)

UP=$(port)
printf '%s\n' "$LIMITS" >"$WORK/up.toml"
"$KEEL" --log-level error serve --config "$WORK/up.toml" --listen "127.0.0.1:$UP" \
  --admin-listen "127.0.0.1:$(port)" >"$WORK/up.log" 2>&1 &
PIDS+=("$!")
wait_port "$UP"

GW=$(port)
printf '%s\n[upstreams.up]\nendpoints = ["127.0.0.1:%s"]\n[models.simple]\nbackend = "up"\n' \
  "$LIMITS" "$UP" >"$WORK/gw.toml"
valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$KEEL" --log-level error serve \
  --config "$WORK/gw.toml" --listen "127.0.0.1:$GW" --admin-listen "127.0.0.1:$(port)" \
  >"$WORK/gw.log" 2>&1 &
VG=$!
PIDS+=("$VG")
wait_port "$GW"

python3 benches/e2e/frames.py request "$WORK/request.bin"
calls() { # calls <n>: prints how many succeeded
  h2load -c 1 -m 8 -n "$1" -d "$WORK/request.bin" -H 'content-type: application/grpc' \
    -H 'te: trailers' "http://127.0.0.1:$GW/inference.GRPCInferenceService/ModelInfer" 2>&1 \
    | awk '/^requests:/ {print $8}'
}
say "warm-up: $WARM calls"
calls "$WARM" >/dev/null
callgrind_control -z "$VG" >/dev/null
say "measured: $N calls"
ok=$(calls "$N")
[ "$ok" = "$N" ] || die "only $ok of $N calls succeeded (h2load counts HTTP 200)"
callgrind_control -d "$VG" >/dev/null
# The dump is written by the gateway's process; wait for it (bounded).
for _ in $(seq 1 100); do
  ls "$WORK"/cg.*.1 >/dev/null 2>&1 && break
  sleep 0.1
done
DUMP=$(ls "$WORK"/cg.*.1 2>/dev/null | head -1)
[ -n "$DUMP" ] || die "callgrind wrote no dump"
TOTAL=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
python3 - "$TOTAL" "$N" "$KEEL" <<'PY'
import sys
total, n, keel = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
print(f"{keel}: {total / n:,.0f} instructions per proxied call ({total:,} over {n} calls)")
PY
