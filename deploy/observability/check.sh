#!/usr/bin/env bash
# Checks the observability assets: the alert rules (promtool check rules), the dashboard
# (valid JSON, only Keel's metric names), and, with --keel BIN, a live scrape of a Keel
# started here (promtool check metrics).
#
#   deploy/observability/check.sh [--keel target/release/keel]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

KEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) KEEL="$2"; shift 2 ;;
    *) echo "usage: $0 [--keel BIN]" >&2; exit 2 ;;
  esac
done

if ! command -v promtool >/dev/null 2>&1; then
  echo "==> installing promtool (Debian package prometheus)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y --no-install-recommends prometheus >/dev/null \
    || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi
promtool --version | head -1

echo "==> promtool check rules"
promtool check rules deploy/observability/prometheus/alerts.yml

echo "==> dashboard: valid JSON, only metric names Keel exposes"
python3 - <<'PY'
import json, re
dash = json.load(open("deploy/observability/grafana/keel.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
known = set(re.findall(r"\| `([a-z_]+)`", open("docs/observability.md").read()))
known |= {n for line in open("docs/observability.md") for n in re.findall(r"`(keel_[a-z_]+)`", line)}
used = {m for e in exprs for m in re.findall(r"\b(keel_[a-z_]+|grpc_(?:server|client)_[a-z_]+)", e)}
base = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
unknown = sorted(b for b in base if b not in known)
assert not unknown, f"the dashboard uses metrics docs/observability.md does not list: {unknown}"
print(f"{len(exprs)} queries over {len(base)} metrics, all documented")
PY

if [ -n "$KEEL" ]; then
  echo "==> live scrape of $KEEL"
  out=$(mktemp); log=$(mktemp)
  "$KEEL" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$out" 2>"$log" &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null || true; rm -f "$out" "$log"' EXIT
  admin=""
  for _ in $(seq 1 300); do
    admin=$(sed -n 's/.*admin on \([0-9.:]*\),.*/\1/p' "$out")
    [ -n "$admin" ] && break
    sleep 0.1
  done
  [ -n "$admin" ] || { echo "keel did not start:"; cat "$log"; exit 1; }
  curl -fsS "http://$admin/metrics" | promtool check metrics
  curl -fsS "http://$admin/livez" >/dev/null
  curl -fsS "http://$admin/readyz" >/dev/null
  echo "scrape of $admin passes promtool check metrics"
fi
echo "==> observability assets OK"
