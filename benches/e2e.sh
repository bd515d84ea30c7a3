#!/usr/bin/env bash
# End-to-end benchmark: the same load against an upstream directly, through Keel, and
# through nginx's grpc_pass, in alternation (A B C A B C ...) in one run, reported as medians
# and ratios, because absolute timings on a shared machine are noise.
#
#   benches/e2e.sh                 # ROUNDS=3 DURATION=5 (seconds) by default
#   ROUNDS=5 DURATION=10 benches/e2e.sh
#   LOADGEN=keel benches/e2e.sh    # `keel load` instead of h2load for scenario 1
#   benches/e2e.sh --json out.json # also write every figure as JSON
#
# Knobs: ROUNDS, DURATION (seconds per run), STREAMS (scenario 1's streams in flight on its
# one connection, 8), RATE (scenario 1's fixed rate, 1000 req/s), LOADGEN (h2load or keel),
# KEEP=1 (keep the work directory), FLOOR=1 (also measure examples/floor.rs, the forwarding
# floor of Keel's crates, in scenario 1), KEEL_B (another keel binary, measured as `keel_b` in
# scenarios 1, 2 and 5 beside this tree's: an A/B in one run), PGO=1 (measure the
# profile-guided build of deploy/pgo.sh, the plain release build as `keel_b`).
#
# Scenario 1 (small unary) runs against a canned-answer upstream: an nginx that reads each
# request body and answers every ModelInfer with one stored gRPC frame (the embedded `simple`
# model's real answer, captured at the start) and a `grpc-status: 0` trailer, so the proxy,
# not a model server, is the bottleneck. The load is h2load with a stored request frame, one
# connection, STREAMS in flight (`keel load --connections 1` where h2load is missing). For
# each target: req/s, mean / p50 / p99 latency, CPU per call of the proxy's processes
# (utime + stime from /proc, every thread and, for nginx, master and workers) and their peak
# RSS. h2load counts HTTP 200 as success, so a short `keel load` run through each target
# first checks that the answers decode and carry grpc-status 0.
#
# Scenarios 2-5 (4 MiB payloads, sick upstreams, memory) use Keels on their embedded backend
# as model servers, and Keels with fault injection as sick ones.
#
# Everything listens on 127.0.0.1 on ports the OS picks, and every process started here is
# stopped on exit. Run as root, it installs what it lacks (Debian's nginx-light and
# nghttp2-client); otherwise it says what is missing and leaves that part out.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
DURATION=${DURATION%s}
STREAMS=${STREAMS:-8}
RATE=${RATE:-1000}
LOADGEN=${LOADGEN:-h2load}
JSON_OUT=""
if [ "${1:-}" = "--json" ]; then JSON_OUT=${2:?--json needs a file}; fi

say() { printf '==> [%4ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
  printf 'e2e.sh: %s\n' "$*" >&2
  exit 1
}

command -v python3 >/dev/null 2>&1 || die "python3 is missing (it builds the frames and the report)"

say "building keel (release)"
cargo build --release --quiet
BUILT=${CARGO_TARGET_DIR:-$PWD/target}/release/keel
# PGO=1: the Keel measured is deploy/pgo.sh's build (profile-guided, as the container image
# is built), and the plain release build beside it as `keel_b` unless KEEL_B names another.
if [ -n "${PGO:-}" ]; then
  say "building keel with profile-guided optimisation (deploy/pgo.sh)"
  OUT=$PWD/target/pgo/keel deploy/pgo.sh
  KEEL_B=${KEEL_B:-$BUILT}
  BUILT=$PWD/target/pgo/keel
fi

# apt_install <command> <Debian package>: installs the package when the command is missing
# and this runs as root; true when the command is there afterwards.
apt_install() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's $2 (for $1)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null 2>&1; } \
      || true
  fi
  command -v "$1" >/dev/null 2>&1
}
HAVE_NGINX=1
apt_install nginx nginx-light || {
  HAVE_NGINX=""
  say "MISSING: nginx (Debian's nginx-light): no canned upstream and no reference proxy;" \
    "scenario 1 runs against a Keel on its embedded backend, without an nginx column"
}
if [ "$LOADGEN" = h2load ] && ! apt_install h2load nghttp2-client; then
  say "MISSING: h2load (Debian's nghttp2-client): scenario 1 uses keel load --connections 1"
  LOADGEN=keel
fi

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
# A copy, so a build in a shared target directory during the run changes nothing.
cp "$BUILT" "$WORK/keel"
KEEL=$WORK/keel
say "keel $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' (with uncommitted changes)'); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

# Waits (bounded) until something accepts connections on 127.0.0.1:$1.
wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1 after 10s" >&2
  return 1
}

# Starts a Keel with policy $2 on traffic port $1; sets LAST_PID.
start_keel() {
  local traffic=$1 policy=$2 admin
  admin=$(port)
  printf '%s\n' "$policy" >"$WORK/keel-$traffic.toml"
  "$KEEL" --log-level error serve --config "$WORK/keel-$traffic.toml" \
    --listen "127.0.0.1:$traffic" --admin-listen "127.0.0.1:$admin" >"$WORK/keel-$traffic.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_port "$traffic"
}

# Starts an nginx with the http{} body $2 (listening on port $1) and $3 worker processes;
# sets LAST_PID (the master).
start_nginx() {
  local p=$1 body=$2 workers=$3 dir=$WORK/nginx-$1
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/error.log error;
daemon off;
events { worker_connections 8192; }
http {
  access_log off;
  server_tokens off;
  client_body_temp_path $dir/body;
  client_max_body_size 0;
  # nginx ends an HTTP/2 connection after 1000 requests by default.
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  http2_max_concurrent_streams 1024;
$body
}
EOF
  nginx -c "$dir/nginx.conf" -p "$dir" >"$dir/stderr" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
  wait_port "$p"
}

LIMITS=$(cat benches/e2e/limits.toml)

# A simulated model server answers as it is told: no retries or breakers of its own.
SERVER="$LIMITS
[defaults.retry]
max_attempts = 1
[defaults.breaker]
enabled = false"

forward() { # forward <upstream port> [extra policy]
  printf '%s\n[upstreams.up]\nendpoints = ["127.0.0.1:%s"]\n' "$LIMITS" "$1"
  for m in simple identity iris; do printf '[models.%s]\nbackend = "up"\n' "$m"; done
  printf '%s\n' "${2:-}"
}

# --- the model server and the stored frames ------------------------------------------------
UP=$(port); start_keel "$UP" "$SERVER"; UP_PID=$LAST_PID
python3 benches/e2e/frames.py request "$WORK/request.bin"
python3 benches/e2e/frames.py capture "$UP" "$WORK/request.bin" "$WORK/answer.bin" >&2

# --- the canned upstream and the proxies ----------------------------------------------------
# Scenario 1's upstream: CANNED (nginx with the stored answer) or, without nginx, the model
# server. Scenario 2's: the model server. Keel routes by model; nginx has a port for each.
NGINX_S1="" NGINX_S2="" NGINX_PID=""
if [ -n "$HAVE_NGINX" ]; then
  CANNED=$(port)
  mkdir -p "$WORK/canned"
  chmod 711 "$WORK" # nginx's workers run as another user and read the stored answer
  cp "$WORK/answer.bin" "$WORK/canned/answer.bin"
  # A POST for a static file is 405, which error_page turns into the file with status 200
  # (an internal GET). mirror makes nginx read the whole request body first: without it
  # nginx answers as soon as the HEADERS frame arrives and resets the stream. Any other gRPC
  # method (path) is UNIMPLEMENTED, so nothing mistakes the answer for another call's.
  start_nginx "$CANNED" "  types { }
  default_type application/grpc;
  server {
    listen 127.0.0.1:$CANNED http2;
    root $WORK/canned;
    location = /inference.GRPCInferenceService/ModelInfer {
      mirror /read-body;
      mirror_request_body on;
      try_files /answer.bin =500;
      error_page 405 =200 /answer.bin;
    }
    location = /answer.bin { internal; etag off; add_trailer grpc-status 0 always; }
    location = /read-body { internal; return 204; }
    location / { add_header grpc-status 12 always; return 200; }
  }" 1
  CANNED_PID=$LAST_PID
  say "canned upstream: nginx on 127.0.0.1:$CANNED answering $(stat -c %s "$WORK/answer.bin") bytes"
  NGINX_S1=$(port); NGINX_S2=$(port)
  start_nginx "$NGINX_S1" "  upstream canned { server 127.0.0.1:$CANNED; keepalive 64; keepalive_requests 1000000000; }
  upstream model { server 127.0.0.1:$UP; keepalive 64; keepalive_requests 1000000000; }
  server {
    listen 127.0.0.1:$NGINX_S1 http2;
    location / { grpc_pass grpc://canned; grpc_read_timeout 60s; grpc_send_timeout 60s; }
  }
  server {
    listen 127.0.0.1:$NGINX_S2 http2;
    location / { grpc_pass grpc://model; grpc_read_timeout 60s; grpc_send_timeout 60s; }
  }" auto
  NGINX_PID=$LAST_PID
  say "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') grpc_pass on 127.0.0.1:$NGINX_S1 (canned) and :$NGINX_S2 (model server)"
else
  CANNED=$UP
  CANNED_PID=$UP_PID
fi

GW=$(port)
start_keel "$GW" "$LIMITS
[upstreams.canned]
endpoints = [\"127.0.0.1:$CANNED\"]
[upstreams.model]
endpoints = [\"127.0.0.1:$UP\"]
[models.simple]
backend = \"canned\"
[models.identity]
backend = \"model\""
GW_PID=$LAST_PID
# KEEL_B=<binary>: a second Keel gateway with the same policy, from another build, measured
# in the same rounds (an A/B of a change, in one run).
GWB=""
if [ -n "${KEEL_B:-}" ]; then
  cp "$KEEL_B" "$WORK/keel_b"
  GWB=$(port); GWB_ADMIN=$(port)
  cp "$WORK/keel-$GW.toml" "$WORK/keel_b.toml"
  "$WORK/keel_b" --log-level error serve --config "$WORK/keel_b.toml" --listen "127.0.0.1:$GWB" \
    --admin-listen "127.0.0.1:$GWB_ADMIN" >"$WORK/keel_b.log" 2>&1 &
  GWB_PID=$!
  PIDS+=("$GWB_PID")
  wait_port "$GWB"
fi

# FLOOR=1: the forwarding floor (examples/floor.rs: hyper's server and h2's client forwarding
# bytes as received, nothing else) in front of the canned upstream, measured in scenario 1's
# rounds: what Keel costs above its own crates.
FLOORP=""
if [ -n "${FLOOR:-}" ]; then
  say "building the forwarding floor (examples/floor.rs)"
  cargo build --release --quiet --example floor
  cp "${CARGO_TARGET_DIR:-$PWD/target}/release/examples/floor" "$WORK/floor"
  FLOORP=$(port)
  "$WORK/floor" "127.0.0.1:$FLOORP" "127.0.0.1:$CANNED" >"$WORK/floor.log" 2>&1 &
  FLOOR_PID=$!
  PIDS+=("$FLOOR_PID")
  wait_port "$FLOORP"
fi

# Scenario 1's targets (name:port:pid of the processes whose CPU and memory count) and
# scenario 2's (name:port).
S1="direct:$CANNED:$CANNED_PID keel:$GW:$GW_PID"
S2="direct:$UP keel:$GW"
if [ -n "$GWB" ]; then
  S1="$S1 keel_b:$GWB:$GWB_PID"
  S2="$S2 keel_b:$GWB"
fi
if [ -n "$FLOORP" ]; then S1="$S1 floor:$FLOORP:$FLOOR_PID"; fi
if [ -n "$NGINX_S1" ]; then
  S1="$S1 nginx:$NGINX_S1:$NGINX_PID"
  S2="$S2 nginx:$NGINX_S2"
fi

# CPU ticks (utime + stime) and peak resident KiB of a process tree (nginx: the master and
# its workers).
cpu_ticks() { python3 benches/e2e/proc.py cpu "$1"; }
hwm_kib() { python3 benches/e2e/proc.py hwm "$1"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# keel_load <name> <target port> <keel load flags...>: one run, its JSON kept.
keel_load() {
  local name=$1 target=$2; shift 2
  "$KEEL" load --target "127.0.0.1:$target" --json "$WORK/$name.json" "$@" >/dev/null 2>"$WORK/$name.err" \
    || { cat "$WORK/$name.err" >&2; return 1; }
}

# small <name> <target port> [rate]: scenario 1's load, one connection, STREAMS in flight,
# closed loop or at a fixed rate; leaves $WORK/<name>.json (rps, ok, latency in ms).
small() {
  local name=$1 target=$2 rate=${3:-}
  if [ "$LOADGEN" = h2load ]; then
    # shellcheck disable=SC2046
    h2load -c 1 -m "$STREAMS" -D "$DURATION" $([ -n "$rate" ] && echo "--rps $rate") \
      -d "$WORK/request.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
      --log-file "$WORK/$name.log" \
      "http://127.0.0.1:$target/inference.GRPCInferenceService/ModelInfer" >"$WORK/$name.out" 2>&1 \
      || { cat "$WORK/$name.out" >&2; return 1; }
    python3 benches/e2e/frames.py h2load "$WORK/$name.out" "$WORK/$name.log" "$WORK/$name.json"
  else
    keel_load "$name" "$target" --payload simple --connections 1 --concurrency "$STREAMS" \
      --duration "${DURATION}s" ${rate:+--rate "$rate"}
  fi
}

# --- 0: every target of scenario 1 answers the stored frame with grpc-status 0 -----------------
for t in $S1; do
  IFS=: read -r name p _ <<<"$t"
  keel_load "verify-$name" "$p" --payload simple --connections 1 --concurrency "$STREAMS" --requests 2000
  python3 - "$WORK/verify-$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if r["success_ratio"] != 1.0:
    sys.exit(f"{sys.argv[2]}: keel load saw {r['errors_by_code']} in {r['requests']} calls")
print(f"==> {sys.argv[2]}: {r['requests']} calls decoded as ModelInferResponse, all grpc-status 0", file=sys.stderr)
PY
done

# --- 1: small unary, at saturation and at a fixed rate, in alternation ----------------------
for mode in sat rate; do
  for r in $(seq 1 "$ROUNDS"); do
    for t in $S1; do
      IFS=: read -r name p pid <<<"$t"
      say "s1_$mode round $r: $name"
      before=$(cpu_ticks "$pid") up_before=$(cpu_ticks "$CANNED_PID")
      small "s1_$mode-$name-$r" "$p" "$([ "$mode" = rate ] && echo "$RATE")"
      # The proxy's CPU over the run, and the canned upstream's (the same work every time).
      echo "$(($(cpu_ticks "$pid") - before)) $(($(cpu_ticks "$CANNED_PID") - up_before))" \
        >"$WORK/s1_$mode-$name-$r.ticks"
      hwm_kib "$pid" >"$WORK/s1-$name.hwm"
    done
  done
done

# --- 2: 4 MiB payloads to the model server, in alternation -------------------------------------
for r in $(seq 1 "$ROUNDS"); do
  for t in $S2; do
    name=${t%%:*}; p=${t##*:}
    say "s2_large round $r: $name"
    keel_load "s2_large-$name-$r" "$p" --payload identity:4MiB --concurrency 8 --connections 2 \
      --duration "${DURATION}s"
  done
done

# --- 3 and 4: a sick upstream -------------------------------------------------------------
SICK10=$(port); start_keel "$SICK10" "$SERVER
[models.simple]
backend = \"embedded\"
[models.simple.fault.abort]
percent = 10
code = \"UNAVAILABLE\""
# The default breaker (5 failures in a row) opens now and then on a 10%-failing upstream at
# this volume (a run of 5 comes about once in 100,000 attempts), and then answers
# BREAKER_OPEN for seconds: the scenario measures retries, so the breaker waits for 50.
GW10=$(port); start_keel "$GW10" "$(forward "$SICK10" '[defaults.breaker]
consecutive_failures = 50')"
say "s3: upstream failing 10% UNAVAILABLE"
keel_load s3_sick10 "$GW10" --payload simple --concurrency 32 --requests 20000

DEAD=$(port); start_keel "$DEAD" "$SERVER
[models.simple]
backend = \"embedded\"
[models.simple.fault.abort]
percent = 100
code = \"UNAVAILABLE\""
GWD=$(port); start_keel "$GWD" "$(forward "$DEAD")"
say "s4: upstream failing 100%"
keel_load s4_dead "$GWD" --payload simple --concurrency 32 --requests 20000

# --- 5: memory ----------------------------------------------------------------------------
SLOW=$(port); start_keel "$SLOW" "$SERVER
[models.simple]
backend = \"embedded\"
[models.simple.fault.delay]
percent = 100
duration = \"3s\""
GWS=$(port); start_keel "$GWS" "$(forward "$SLOW")"; GWS_PID=$LAST_PID
sleep 1
RSS_IDLE=$(rss_kib "$GWS_PID")
peak_during() { # peak_during <concurrency> [gateway port] [gateway pid]
  local c=$1 gw=${2:-$GWS} pid=${3:-$GWS_PID} peak=0 now
  "$KEEL" load --target "127.0.0.1:$gw" --payload simple --concurrency "$c" --connections 64 \
    --requests "$c" --deadline 60s --json "$WORK/s5-$c.json" >/dev/null 2>"$WORK/s5-$c.err" &
  local lp=$!
  while kill -0 "$lp" 2>/dev/null; do
    now=$(rss_kib "$pid"); [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.1
  done
  wait "$lp" || { cat "$WORK/s5-$c.err" >&2; return 1; }
  echo "$peak"
}
say "s5: memory at 1,000 and 10,000 calls in flight to a slow upstream"
RSS_1K=$(peak_during 1000)
RSS_10K=$(peak_during 10000)
sleep 2
RSS_AFTER=$(rss_kib "$GWS_PID")
# The other build's memory, the same way (idle, 1,000, 10,000, after; KiB).
if [ -n "$GWB" ]; then
  GWSB=$(port)
  printf '%s\n' "$(forward "$SLOW")" >"$WORK/keel_b-s5.toml"
  "$WORK/keel_b" --log-level error serve --config "$WORK/keel_b-s5.toml" --listen "127.0.0.1:$GWSB" \
    --admin-listen "127.0.0.1:$(port)" >"$WORK/keel_b-s5.log" 2>&1 &
  GWSB_PID=$!
  PIDS+=("$GWSB_PID")
  wait_port "$GWSB"
  sleep 1
  say "s5: the same through keel_b"
  b_idle=$(rss_kib "$GWSB_PID")
  b_1k=$(peak_during 1000 "$GWSB" "$GWSB_PID")
  b_10k=$(peak_during 10000 "$GWSB" "$GWSB_PID")
  sleep 2
  echo "$b_idle $b_1k $b_10k $(rss_kib "$GWSB_PID")" >"$WORK/s5-keel_b.kib"
fi

# --- report -------------------------------------------------------------------------------
say "runs done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
python3 benches/e2e/report.py "$WORK" "$ROUNDS" "$S1" "$S2" "$(getconf CLK_TCK)" \
  "$RSS_IDLE" "$RSS_1K" "$RSS_10K" "$RSS_AFTER" "$LOADGEN" "$STREAMS" "$RATE" \
  "$([ -n "$HAVE_NGINX" ] && echo canned || echo embedded)" "$JSON_OUT"
