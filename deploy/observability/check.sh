#!/usr/bin/env bash
# Checks Keel's observability assets:
#   - the alerting rules: promtool check rules, and their unit tests (promtool test rules);
#   - the example scrape config: promtool check config;
#   - the Grafana dashboard: valid JSON (python3 -m json.tool), every query parses as PromQL,
#     and every query, variable and annotation uses only metrics and labels listed in
#     docs/observability.md;
#   - status codes in label matchers (dashboard, alerts, the PromQL in the docs) are
#     go-grpc-prometheus's names (`Unavailable`), which is how Keel's metrics spell them;
#   - every alert has its runbook, listed in docs/runbooks/README.md;
#   - optionally a live /metrics: promtool check metrics, either from a running Keel
#     (--metrics-url) or from one started here on free ports (--keel BIN).
#
#   deploy/observability/check.sh [--metrics-url http://127.0.0.1:8002/metrics] [--keel target/release/keel]
#
# promtool comes from Debian's prometheus package and PyYAML from python3-yaml; both are
# installed with apt-get when missing (with sudo unless run as root).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

usage() { echo "usage: $0 [--metrics-url URL] [--keel BIN]" >&2; exit 2; }

METRICS_URL=""
KEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --metrics-url) [ $# -ge 2 ] || usage; METRICS_URL="$2"; shift 2 ;;
    --keel) [ $# -ge 2 ] || usage; KEEL="$2"; shift 2 ;;
    -h|--help) usage ;;
    *) usage ;;
  esac
done

OBS=deploy/observability

# promtool (Debian's prometheus package) and PyYAML (python3-yaml, to read the rules below).
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (Debian packages)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  # A clean image may have no package lists yet: update and try once more.
  $SUDO apt-get install -y --no-install-recommends "${need[@]}" \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "${need[@]}"; }
  command -v promtool >/dev/null 2>&1 || { echo "promtool is still not on PATH" >&2; exit 1; }
fi
promtool --version 2>&1 | sed -n 1p

echo "==> promtool check rules"
promtool check rules "$OBS/prometheus/alerts.yml"

echo "==> promtool test rules"
(cd "$OBS/prometheus" && promtool test rules alerts_test.yml)

echo "==> promtool check config (scrape example)"
promtool check config "$OBS/prometheus/scrape.yml"

echo "==> dashboard: valid JSON"
python3 -m json.tool "$OBS/grafana/keel.json" >/dev/null
echo "$OBS/grafana/keel.json is valid JSON"

echo "==> dashboard and alerts: PromQL parses, only documented metrics and labels, a runbook per alert"
python3 - "$OBS" <<'PY'
import json, os, re, sys

obs = sys.argv[1]
problems = []

# The metrics table of docs/observability.md: | `name` | type | labels | meaning |
labels_of, type_of = {}, {}
for line in open("docs/observability.md"):
    m = re.match(r"\|\s*`((?:keel|grpc)_[a-z_]+)`\s*\|\s*(\w+)\s*\|([^|]*)\|", line)
    if m:
        name, kind, labels = m.groups()
        type_of[name] = kind
        labels_of[name] = {l.strip(" `") for l in labels.split(",") if l.strip(" `-—")}
assert labels_of, "no metrics table found in docs/observability.md"

NAME = re.compile(r"\b(keel_[a-z_]+|grpc_(?:server|client)_[a-z_]+)")
GENERIC = {"job", "instance", "le"}  # target labels, and le on histogram buckets

def base(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and type_of.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name

def check(where, expr):
    names = {base(n) for n in NAME.findall(expr)}
    for n in sorted(names - labels_of.keys()):
        problems.append(f"{where}: metric {n} is not in docs/observability.md")
    known = set(GENERIC).union(*(labels_of.get(n, set()) for n in names))
    if "label_replace(" in expr:
        known |= set(re.findall(r'label_replace\([^"]*"(\w+)"', expr, re.S))
    # Selectors: name{label="..."} or {__name__=~"a|b", label="..."}.
    for name, body in re.findall(r"([a-z_]*)\{([^}]*)\}", expr):
        if name == "" and "__name__" not in body:
            continue  # a template, such as {{model}}
        selector_labels = {l for l in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body)} - {"__name__"}
        allowed = set(GENERIC)
        if name:
            allowed |= labels_of.get(base(name), set())
        else:
            allowed |= known
        for l in sorted(selector_labels - allowed):
            problems.append(f"{where}: label {l} is not a label of {name or 'these metrics'}")
    # Grouping and matching: by (...), without (...), on (...), ignoring (...), label_values(..., l).
    grouped = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouped |= {l.strip() for l in group.split(",") if l.strip()}
    grouped |= set(re.findall(r"label_values\(.*,\s*(\w+)\)\s*$", expr))
    for l in sorted(grouped - known):
        problems.append(f"{where}: label {l} is not a label of the metrics it uses")

dash = json.load(open(f"{obs}/grafana/keel.json"))

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

ids = set()
queries = 0
for p in panels(dash["panels"]):
    where = f"panel {p.get('id')} '{p.get('title')}'"
    if p.get("id") in ids:
        problems.append(f"{where}: duplicate panel id")
    ids.add(p.get("id"))
    g = p.get("gridPos", {})
    if g.get("x", 0) + g.get("w", 0) > 24:
        problems.append(f"{where}: wider than the 24-column grid")
    if p.get("type") != "row" and p.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"{where}: datasource is not the ${{datasource}} variable")
    for t in p.get("targets", []):
        queries += 1
        check(where, t["expr"])
        if t.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where} {t.get('refId')}: datasource is not the ${{datasource}} variable")
for v in dash["templating"]["list"]:
    if v["type"] == "query":
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        check(f"variable {v['name']}", q)
for a in dash.get("annotations", {}).get("list", []):
    if "expr" in a:
        check(f"annotation '{a['name']}'", a["expr"])

import yaml
rules = yaml.safe_load(open(f"{obs}/prometheus/alerts.yml"))
readme = open("docs/runbooks/README.md").read()
alerts = 0
for group in rules["groups"]:
    for r in group["rules"]:
        name = r["alert"]
        alerts += 1
        check(f"alert {name}", r["expr"])
        url = r.get("annotations", {}).get("runbook_url", "")
        if url != f"docs/runbooks/{name}.md":
            problems.append(f"alert {name}: runbook_url is {url!r}, not docs/runbooks/{name}.md")
        if not os.path.isfile(f"docs/runbooks/{name}.md"):
            problems.append(f"alert {name}: docs/runbooks/{name}.md does not exist")
        if f"({name}.md)" not in readme:
            problems.append(f"alert {name}: not linked from docs/runbooks/README.md")
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            problems.append(f"alert {name}: labels.severity missing or unusual")
        for key in ("summary", "description"):
            if not r.get("annotations", {}).get(key):
                problems.append(f"alert {name}: annotations.{key} missing")

# Status codes in labels are go-grpc-prometheus's spelling (grpc-go's codes.Code.String()),
# not the canonical UNAVAILABLE that logs and policies use: a matcher on "UNAVAILABLE"
# would select nothing. Checked in the dashboard, the alerts and the PromQL in the docs.
GO_CODES = {"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
            "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
            "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
            "Unauthenticated"}
CODE_MATCHER = re.compile(r'\b(grpc_code|code)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
def check_codes(where, expr):
    for name, body in re.findall(r"([a-z_]+)\{([^}]*)\}", expr):
        if not name.startswith(("keel_", "grpc_")):
            continue
        for label, value in CODE_MATCHER.findall(body):
            for v in value.split("|"):
                if v and v not in GO_CODES:
                    problems.append(f"{where}: {name}{{{label}=...\"{v}\"}} is not a go-grpc-prometheus code name ({', '.join(sorted(GO_CODES))})")
for p in panels(dash["panels"]):
    for t in p.get("targets", []):
        check_codes(f"panel {p.get('id')} '{p.get('title')}'", t["expr"])
for group in rules["groups"]:
    for r in group["rules"]:
        check_codes(f"alert {r['alert']}", r["expr"])
docs = ["docs/observability.md"] + sorted(
    os.path.join("docs/runbooks", f) for f in os.listdir("docs/runbooks") if f.endswith(".md"))
for doc in docs:
    for n, line in enumerate(open(doc), 1):
        check_codes(f"{doc}:{n}", line)

# Every dashboard query must parse as PromQL: check them as recording rules, with Grafana's
# variables replaced by values.
import subprocess, tempfile
exprs = [(f"panel_{p.get('id')}_{t.get('refId')}", t["expr"])
         for p in panels(dash["panels"]) for t in p.get("targets", [])]
exprs += [(f"annotation_{i}", a["expr"]) for i, a in enumerate(dash.get("annotations", {}).get("list", [])) if "expr" in a]
def concrete(e):
    e = e.replace("$__rate_interval", "1m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", e)
with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:{name}", "expr": concrete(e)} for name, e in exprs]}]}, f)
r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
os.unlink(f.name)
if r.returncode != 0:
    problems.append("dashboard queries that do not parse as PromQL:\n" + r.stdout + r.stderr)

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{queries} dashboard queries parse as PromQL; they and the {alerts} alerts use only "
      f"documented metrics and labels; every alert has its runbook")
PY

scrape_check() {
  # $1: the /metrics URL.
  local body
  body=$(mktemp)
  curl -fsS --max-time 10 "$1" -o "$body"
  promtool check metrics <"$body"
  echo "$(grep -c '^# TYPE' "$body") metric families at $1 pass promtool check metrics"
  rm -f "$body"
}

if [ -n "$METRICS_URL" ]; then
  echo "==> live scrape of $METRICS_URL"
  scrape_check "$METRICS_URL"
fi

if [ -n "$KEEL" ]; then
  echo "==> live scrape of a Keel started from $KEEL"
  [ -x "$KEEL" ] || { echo "$KEEL is not an executable (build it: cargo build --release --bin keel)" >&2; exit 1; }
  out=$(mktemp); log=$(mktemp)
  "$KEEL" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 >"$out" 2>"$log" &
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$out" "$log"' EXIT
  admin=""
  for _ in $(seq 1 300); do
    admin=$(sed -n 's/.*admin on \([0-9.:]*\),.*/\1/p' "$out")
    [ -n "$admin" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$admin" ] || { echo "keel did not start:" >&2; cat "$log" >&2; exit 1; }
  scrape_check "http://$admin/metrics"
  curl -fsS --max-time 5 "http://$admin/livez" >/dev/null
  curl -fsS --max-time 5 "http://$admin/readyz" >/dev/null
  echo "/livez and /readyz on $admin answer 200"
fi

echo "==> observability assets OK"
