#!/usr/bin/env bash
# Builds Keel with profile-guided optimisation: an instrumented build forwards a training
# load, and the release build is compiled again with that profile, so the compiler lays out
# and inlines the code of the forwarding path by how often it really runs. On the small
# unary forwarding benchmark this cut instructions per proxied call by 22%
# (docs/benchmarks.md, "profile-guided"); the binary behaves exactly as the plain release
# build does.
#
#   deploy/pgo.sh              # writes target/pgo/keel
#   OUT=/usr/local/bin/keel deploy/pgo.sh
#
# The training load: a gateway (the instrumented binary) forwards ModelInfer calls of the
# embedded `simple` model, small unary calls over one and over several connections, and
# ModelMetadata/ModelReady calls, to a second Keel on its embedded backend whose own
# profile is thrown away. Only the gateway's profile is kept. Needs h2load (Debian's
# nghttp2-client), python3, and rustup's llvm-tools (installed here when missing). Takes two
# release builds (about 12 minutes on 2 cores). Everything listens on 127.0.0.1 on ports
# the OS picks, and every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/target/pgo/keel}
BASE=${PGO_TARGET_DIR:-$PWD/target/pgo}
CALLS=${CALLS:-40000}
say() { printf '==> [%4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
  printf 'pgo.sh: %s\n' "$*" >&2
  exit 1
}

command -v python3 >/dev/null 2>&1 || die "python3 is missing (it builds the request frame)"
if ! command -v h2load >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  say "installing Debian's nghttp2-client (h2load)"
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq --no-install-recommends nghttp2-client ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends nghttp2-client; }; } \
    >/dev/null 2>&1 || true
fi
command -v h2load >/dev/null 2>&1 || die "h2load is missing (Debian's nghttp2-client)"

# llvm-profdata of the compiler's own LLVM: another version may not read its profiles.
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$sysroot/lib/rustlib/$host/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
  say "adding rustup's llvm-tools (llvm-profdata)"
  rustup component add llvm-tools >/dev/null 2>&1 || die "rustup component add llvm-tools failed"
fi
[ -x "$PROFDATA" ] || die "no llvm-profdata at $PROFDATA"

# shellcheck source=benches/e2e/procs.sh
source benches/e2e/procs.sh

say "building the instrumented keel (release, -Cprofile-generate)"
# A fixed path, so that a second run finds the instrumented build up to date (the runs below
# say where their profiles go).
CARGO_TARGET_DIR=$BASE/generate RUSTFLAGS="-Cprofile-generate=$BASE/generate/profiles" \
  cargo build --release --locked --quiet --bin keel
TRAINEE=$BASE/generate/release/keel

# port_of <log>: the port a Keel says it listens on (`listening on 127.0.0.1:PORT`).
port_of() {
  local log=$1 i
  for i in $(seq 1 200); do
    if grep -q "listening" "$log" 2>/dev/null; then
      grep -m1 -o '127\.0\.0\.1:[0-9]*' "$log" | head -1 | cut -d: -f2
      return 0
    fi
    sleep 0.05
  done
  die "no listening line in $log: $(tail -3 "$log")"
}

# The model server: the embedded backend; its profile goes to `discard`.
LLVM_PROFILE_FILE=$WORK/discard/%p-%m.profraw "$TRAINEE" --log-level info serve \
  --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$WORK/up.log" 2>&1 &
PIDS+=($!)
UP=$(port_of "$WORK/up.log")
cat >"$WORK/gw.toml" <<EOT
$(cat benches/e2e/limits.toml)
[upstreams.model]
endpoints = ["127.0.0.1:$UP"]
[models.simple]
backend = "model"
EOT
LLVM_PROFILE_FILE=$WORK/kept/%p-%m.profraw "$TRAINEE" --log-level info serve \
  --config "$WORK/gw.toml" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$WORK/gw.log" 2>&1 &
GW_PID=$!
PIDS+=($GW_PID)
GW=$(port_of "$WORK/gw.log")

python3 benches/e2e/frames.py request "$WORK/request.bin"
url() { printf 'http://127.0.0.1:%s/inference.GRPCInferenceService/%s' "$GW" "$1"; }
h2() {
  h2load "$@" -H content-type:application/grpc -H te:trailers 2>&1 |
    grep -E '^requests:' | sed 's/^/    /' >&2
}
say "training: $CALLS ModelInfer calls through the instrumented gateway"
h2 -c 1 -m 8 -n "$CALLS" -d "$WORK/request.bin" "$(url ModelInfer)"
h2 -c 4 -m 2 -n $((CALLS / 4)) -d "$WORK/request.bin" "$(url ModelInfer)"
h2 -c 1 -m 1 -n $((CALLS / 20)) -d "$WORK/request.bin" "$(url ModelInfer)"
# ModelMetadata and ModelReady for `simple` (field 1, the name).
printf '\x00\x00\x00\x00\x08\x0a\x06simple' >"$WORK/name.bin"
h2 -c 1 -m 4 -n 2000 -d "$WORK/name.bin" "$(url ModelMetadata)"
h2 -c 1 -m 4 -n 2000 -d "$WORK/name.bin" "$(url ModelReady)"
# A profile is written when the process exits.
kill -INT "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
ls "$WORK"/kept/*.profraw >/dev/null 2>&1 || die "the gateway wrote no profile"
"$PROFDATA" merge -o "$WORK/keel.profdata" "$WORK"/kept/*.profraw
# Named by its contents: cargo rebuilds when RUSTFLAGS change, not when a file they name
# does, so a new profile must be a new name.
PROFILE=$BASE/keel-$(sha256sum "$WORK/keel.profdata" | cut -c1-16).profdata
cp "$WORK/keel.profdata" "$PROFILE"

say "building keel with the profile (release, -Cprofile-use)"
CARGO_TARGET_DIR=$BASE/use RUSTFLAGS="-Cprofile-use=$PROFILE" \
  cargo build --release --locked --quiet --bin keel
install -D -m 0755 "$BASE/use/release/keel" "$OUT"
say "built $OUT"
