#!/usr/bin/env bash
# End-to-end benchmark: the same load against a model server directly, through Keel, and
# through nginx's grpc_pass (where Debian's nginx is installed or installable), in
# alternation (A B C A B C ...) in one run, reported as medians and ratios, because absolute
# timings on a shared machine are noise.
#
#   benches/e2e.sh                 # ROUNDS=3 DURATION=5s by default
#   ROUNDS=5 DURATION=10s benches/e2e.sh
#   benches/e2e.sh --json out.json # also write every figure as JSON
#
# The model server is a Keel on its embedded backend (the `simple`, `identity` and `iris`
# models); sick servers are Keels with fault injection. Everything listens on 127.0.0.1 on
# ports the OS picks, and every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
JSON_OUT=""
if [ "${1:-}" = "--json" ]; then JSON_OUT=${2:?--json needs a file}; fi

say() { printf '==> %s\n' "$*" >&2; }

say "building keel (release)"
cargo build --release --quiet
KEEL=$PWD/target/release/keel

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

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

LIMITS='[server]
max_in_flight = 100000
watch = false
[defaults.limits]
max_in_flight = 100000
max_queue = 100000'

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

# --- the servers ---------------------------------------------------------------------
UP=$(port); start_keel "$UP" "$SERVER"; UP_PID=$LAST_PID
GW=$(port); start_keel "$GW" "$(forward "$UP")"; GW_PID=$LAST_PID

NGINX=""
if ! command -v nginx >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  say "installing Debian's nginx (the reference proxy)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null 2>&1; } \
    || true
fi
if command -v nginx >/dev/null 2>&1; then
  NG=$(port)
  mkdir -p "$WORK/nginx"
  cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log error;
daemon off;
events { worker_connections 65536; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/body;
  client_max_body_size 0;
  upstream up { server 127.0.0.1:$UP; keepalive 64; }
  server {
    listen 127.0.0.1:$NG http2;
    location / { grpc_pass grpc://up; grpc_read_timeout 60s; grpc_send_timeout 60s; }
  }
}
EOF
  nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" >/dev/null 2>&1 &
  PIDS+=("$!")
  wait_port "$NG"
  NGINX=$NG
  say "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') grpc_pass on 127.0.0.1:$NG"
else
  say "nginx not available: the reference proxy column is left out"
fi

targets="direct:$UP keel:$GW"
[ -n "$NGINX" ] && targets="$targets nginx:$NGINX"

# load <name> <target port> <extra keel load flags...>: one run, JSON kept.
load() {
  local name=$1 target=$2; shift 2
  "$KEEL" load --target "127.0.0.1:$target" --json "$WORK/$name.json" "$@" >/dev/null 2>"$WORK/$name.err" \
    || { cat "$WORK/$name.err" >&2; return 1; }
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# --- 1 and 2: throughput and added latency, in alternation ------------------------------
declare -A SCEN=(
  [s1_saturation]="--payload simple --concurrency 64 --connections 4 --duration $DURATION"
  [s1_rate]="--payload simple --rate 1000 --concurrency 256 --connections 4 --duration $DURATION"
  [s2_large]="--payload identity:4MiB --concurrency 8 --connections 2 --duration $DURATION"
)
CPU_KEEL_TICKS=0; CPU_KEEL_REQS=0
for scenario in s1_saturation s1_rate s2_large; do
  for r in $(seq 1 "$ROUNDS"); do
    for t in $targets; do
      name=${t%%:*}; p=${t##*:}
      say "$scenario round $r: $name"
      before=$(cpu_ticks "$GW_PID")
      # shellcheck disable=SC2086
      load "$scenario-$name-$r" "$p" ${SCEN[$scenario]}
      if [ "$scenario" = s1_saturation ] && [ "$name" = keel ]; then
        CPU_KEEL_TICKS=$((CPU_KEEL_TICKS + $(cpu_ticks "$GW_PID") - before))
        CPU_KEEL_REQS=$((CPU_KEEL_REQS + $(python3 -c "import json;print(json.load(open('$WORK/$scenario-$name-$r.json'))['requests'])")))
      fi
    done
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
load s3_sick10 "$GW10" --payload simple --concurrency 32 --requests 20000

DEAD=$(port); start_keel "$DEAD" "$SERVER
[models.simple]
backend = \"embedded\"
[models.simple.fault.abort]
percent = 100
code = \"UNAVAILABLE\""
GWD=$(port); start_keel "$GWD" "$(forward "$DEAD")"
say "s4: upstream failing 100%"
load s4_dead "$GWD" --payload simple --concurrency 32 --requests 20000

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
peak_during() { # peak_during <concurrency>
  local c=$1 peak=0 now
  "$KEEL" load --target "127.0.0.1:$GWS" --payload simple --concurrency "$c" --connections 64 \
    --requests "$c" --deadline 60s --json "$WORK/s5-$c.json" >/dev/null 2>"$WORK/s5-$c.err" &
  local lp=$!
  while kill -0 "$lp" 2>/dev/null; do
    now=$(rss_kib "$GWS_PID"); [ "$now" -gt "$peak" ] && peak=$now
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

# --- report -------------------------------------------------------------------------------
python3 - "$WORK" "$ROUNDS" "$targets" "$CPU_KEEL_TICKS" "$CPU_KEEL_REQS" "$(getconf CLK_TCK)" \
  "$RSS_IDLE" "$RSS_1K" "$RSS_10K" "$RSS_AFTER" "$JSON_OUT" <<'PY'
import json, statistics, sys
work, rounds, targets = sys.argv[1], int(sys.argv[2]), [t.split(":")[0] for t in sys.argv[3].split()]
cpu_ticks, cpu_reqs, clk = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
rss = dict(zip(["idle", "1k", "10k", "after"], (int(x) / 1024 for x in sys.argv[7:11])))
out_json = sys.argv[11]

def runs(scen, t):
    return [json.load(open(f"{work}/{scen}-{t}-{r}.json")) for r in range(1, rounds + 1)]

def med(scen, t, f):
    return statistics.median(f(r) for r in runs(scen, t))

figures = {}
print(f"\n{rounds} rounds per target, in alternation ({', '.join(targets)})\n")
for scen, title in [("s1_saturation", "1. small unary (simple [1,16] INT32) at saturation, 64 in flight"),
                    ("s1_rate", "1. small unary at a fixed 1000 req/s (open loop)"),
                    ("s2_large", "2. large payload (identity, 4 MiB FP32), 8 in flight")]:
    print(title)
    print(f"  {'target':<8} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'ok %':>8}")
    row = {}
    for t in targets:
        rps = med(scen, t, lambda r: r["rps"])
        p50 = med(scen, t, lambda r: r["latency_ms"]["p50"])
        p99 = med(scen, t, lambda r: r["latency_ms"]["p99"])
        ok = med(scen, t, lambda r: r["success_ratio"]) * 100
        row[t] = dict(rps=rps, p50=p50, p99=p99, ok=ok)
        print(f"  {t:<8} {rps:>10.0f} {p50:>9.3f} {p99:>9.3f} {ok:>8.3f}")
    d, k = row["direct"], row["keel"]
    print(f"  keel/direct throughput {k['rps']/d['rps']:.3f}; added p50 {k['p50']-d['p50']:+.3f} ms, p99 {k['p99']-d['p99']:+.3f} ms")
    if "nginx" in row:
        n = row["nginx"]
        print(f"  keel/nginx throughput {k['rps']/n['rps']:.3f}; nginx added p50 {n['p50']-d['p50']:+.3f} ms, p99 {n['p99']-d['p99']:+.3f} ms")
    figures[scen] = row
    print()

s3 = json.load(open(f"{work}/s3_sick10.json"))
print("3. upstream failing 10% UNAVAILABLE, 3 attempts, through Keel")
print(f"  success {s3['success_ratio']*100:.3f}% of {s3['requests']}; attempts per request {s3['attempts_per_request']:.3f}\n")
s4 = json.load(open(f"{work}/s4_dead.json"))
print("4. upstream failing 100%, through Keel")
print(f"  attempts per request {s4['attempts_per_request']:.3f} (budget: 1 + 0.2 + floor); "
      f"p99 {s4['latency_ms']['p99']:.3f} ms; errors by reason {s4['errors_by_reason']}\n")
print("5. Keel's resident memory (MiB)")
print(f"  idle {rss['idle']:.1f}; peak with 1,000 in flight {rss['1k']:.1f}; with 10,000 {rss['10k']:.1f}; after {rss['after']:.1f}\n")
cpu = cpu_ticks / clk / max(cpu_reqs / 1000, 1e-9)
print("6. CPU (scenario 1 at saturation, through Keel)")
print(f"  {cpu:.4f} CPU-seconds per 1,000 requests\n")
figures.update(s3=s3, s4=s4, rss_mib=rss, cpu_s_per_1000=cpu)
if out_json:
    json.dump(figures, open(out_json, "w"), indent=2)
PY
