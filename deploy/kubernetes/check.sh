#!/usr/bin/env bash
# Checks Keel's Kubernetes manifests:
#   - the PrometheusRule is generated from deploy/observability/prometheus/alerts.yml
#     (prometheusrule.py --check);
#   - kustomize renders both overlays (dev, production), and the result is what
#     rendered/*.yaml holds (tests/deploy.rs reads those files);
#   - every rendered object, and overlays/production/secret.example.yaml, validates against
#     the Kubernetes schemas of 1.30 (the oldest this supports: preStop `sleep`) and of the
#     newest release kubernetes-validate knows, strictly (unknown fields are errors); the
#     ServiceMonitor and PrometheusRule against the Prometheus operator's CRD schemas;
#   - the policy in each rendered ConfigMap passes `keel validate --skip-files` (the
#     certificate files it names are mounted from the Secret only in the pod; tests/deploy.rs
#     checks that they are);
#   - the rendered PrometheusRule's rules pass `promtool check rules` and equal alerts.yml;
#   - hadolint finds nothing to say about deploy/Dockerfile (the image is not built here);
#   - the Dockerfile, manifests, policy and Keel's defaults agree (cargo test --test deploy).
#
#   deploy/kubernetes/check.sh [--keel target/release/keel] [--write]
#
# --write regenerates the PrometheusRule and rendered/*.yaml instead of failing when they
# are stale (then the checks run on the new files).
#
# What it needs, it installs: kubernetes-validate and hadolint (PyPI) in
# target/deploy-venv; the Prometheus operator's schemas (@kubernetes-models/prometheus-operator,
# npm) in target/deploy-node; promtool (Debian's prometheus package) and Node.js (Debian's
# nodejs) with apt-get when missing. kustomize is `kustomize` or `kubectl kustomize` (v4 or newer)
# from PATH: neither Debian nor PyPI packages a current one, so it cannot be installed here
# (the machine image's kubectl carries kustomize v5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

usage() { echo "usage: $0 [--keel BIN] [--write]" >&2; exit 2; }
KEEL=${CARGO_TARGET_DIR:-target}/release/keel
WRITE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keel) [ $# -ge 2 ] || usage; KEEL="$2"; shift 2 ;;
    --write) WRITE=1; shift ;;
    *) usage ;;
  esac
done

K8S=deploy/kubernetes
TARGET=${CARGO_TARGET_DIR:-target}
VENV=$TARGET/deploy-venv
NODE_DIR=$TARGET/deploy-node
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The Kubernetes versions every object is validated against.
KUBE_VERSIONS="1.30.0 1.37.0"

apt_install() {
  local SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  # A clean image may have no package lists yet: update and try once more.
  $SUDO apt-get install -y --no-install-recommends "$@" \
    || { $SUDO apt-get update && $SUDO apt-get install -y --no-install-recommends "$@"; }
}

# ---- tools ------------------------------------------------------------------------------

echo "==> kustomize"
KUSTOMIZE=()
if command -v kustomize >/dev/null 2>&1; then
  KUSTOMIZE=(kustomize build)
  kustomize version
elif command -v kubectl >/dev/null 2>&1 \
    && kubectl version --client 2>/dev/null | grep -Eq '^Kustomize Version: v([4-9]|[1-9][0-9])\.'; then
  KUSTOMIZE=(kubectl kustomize)
  kubectl version --client 2>/dev/null | grep -E 'Client Version|Kustomize Version'
elif [ "$WRITE" = 1 ]; then
  echo "no kustomize v4+: install kustomize, or a kubectl of 1.21 or newer (kubectl kustomize)." >&2
  echo "(Debian's kubernetes-client is kubectl 1.20, with kustomize v2, which cannot render these.)" >&2
  exit 1
else
  # None of this machine's registries offers a current kustomize; the machine image's
  # kubectl carries one. Without it, the committed renderings (made by a real kustomize)
  # are still validated below; only the re-render-and-compare step is skipped, loudly.
  echo "WARNING: no kustomize v4+ here (neither kustomize nor kubectl kustomize):" >&2
  echo "WARNING: NOT re-rendering the overlays; validating the committed rendered/*.yaml only." >&2
fi

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing ${need[*]} (Debian packages)"
  apt_install "${need[@]}"
fi
promtool --version 2>&1 | sed -n 1p
echo "node $(node --version), npm $(npm --version)"

# kubernetes-validate in a virtualenv, rebuilt when requirements.txt or Python change.
want=$(python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest(), sys.version.split()[0])' "$K8S/requirements.txt")
if [[ -x $VENV/bin/python && -f $VENV/.stamp && "$(cat "$VENV/.stamp")" == "$want" ]]; then
  echo "==> reusing $VENV"
else
  echo "==> creating $VENV ($K8S/requirements.txt)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$K8S/requirements.txt"
  echo "$want" >"$VENV/.stamp"
fi

# The Prometheus operator's schemas, from the lock file.
want=$(cat "$K8S/crd-check/package.json" "$K8S/crd-check/package-lock.json" | sha256sum | cut -d' ' -f1)
if [[ -d $NODE_DIR/node_modules && -f $NODE_DIR/.stamp && "$(cat "$NODE_DIR/.stamp")" == "$want" ]]; then
  echo "==> reusing $NODE_DIR"
else
  echo "==> installing $K8S/crd-check into $NODE_DIR (npm ci)"
  rm -rf "$NODE_DIR"
  mkdir -p "$NODE_DIR"
  cp "$K8S/crd-check/package.json" "$K8S/crd-check/package-lock.json" "$NODE_DIR/"
  (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" >"$NODE_DIR/.stamp"
fi
cp "$K8S/crd-check/validate.mjs" "$NODE_DIR/"

if [ ! -x "$KEEL" ]; then
  echo "==> building keel (cargo build --release --bin keel)"
  cargo build --release --bin keel
fi

# ---- generated files --------------------------------------------------------------------

echo "==> PrometheusRule generated from deploy/observability/prometheus/alerts.yml"
if [ "$WRITE" = 1 ]; then
  python3 "$K8S/prometheusrule.py"
else
  python3 "$K8S/prometheusrule.py" --check
fi

echo "==> kustomize renders the overlays"
for overlay in dev production; do
  if [ ${#KUSTOMIZE[@]} -eq 0 ]; then
    cp "$K8S/rendered/$overlay.yaml" "$OUT/$overlay.yaml"
    continue
  fi
  {
    echo "# GENERATED by deploy/kubernetes/check.sh --write: kustomize's rendering of"
    echo "# overlays/$overlay. Do not edit; tests/deploy.rs checks it, check.sh keeps it current."
    "${KUSTOMIZE[@]}" "$K8S/overlays/$overlay"
  } >"$OUT/$overlay.yaml"
  echo "$K8S/overlays/$overlay: $(grep -c '^kind:' "$OUT/$overlay.yaml") objects"
  if [ "$WRITE" = 1 ]; then
    cp "$OUT/$overlay.yaml" "$K8S/rendered/$overlay.yaml"
  elif ! diff -u "$K8S/rendered/$overlay.yaml" "$OUT/$overlay.yaml" >"$OUT/$overlay.diff"; then
    cat "$OUT/$overlay.diff"
    echo "$K8S/rendered/$overlay.yaml is stale: run $0 --write and commit it" >&2
    exit 1
  fi
done

# ---- validation -------------------------------------------------------------------------

echo "==> Kubernetes schemas ($KUBE_VERSIONS, strict) and the policy and rules inside"
"$VENV/bin/python" - "$OUT" "$KUBE_VERSIONS" "$K8S/rendered/dev.yaml" "$K8S/rendered/production.yaml" \
    "$K8S/overlays/production/secret.example.yaml" <<'PY'
import json, os, sys
import yaml
import kubernetes_validate as kv

out, versions, files = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
CRD_GROUPS = ("monitoring.coreos.com/",)
problems, crds, passed = [], [], 0
for f in files:
    for o in (d for d in yaml.safe_load_all(open(f)) if d):
        where = f"{f}: {o.get('kind')}/{o.get('metadata', {}).get('name')}"
        overlay = os.path.splitext(os.path.basename(f))[0]
        if o["kind"] == "ConfigMap" and "policy.toml" in o.get("data", {}):
            with open(os.path.join(out, f"{overlay}.policy.toml"), "w") as p:
                p.write(o["data"]["policy.toml"])
        if o["kind"] == "PrometheusRule":
            with open(os.path.join(out, f"{overlay}.rules.yml"), "w") as r:
                yaml.safe_dump(o["spec"], r, sort_keys=False)
            alerts = yaml.safe_load(open("deploy/observability/prometheus/alerts.yml"))
            if o["spec"] != alerts:
                problems.append(f"{where}: spec differs from deploy/observability/prometheus/alerts.yml")
        if o.get("apiVersion", "").startswith(CRD_GROUPS):
            crds.append(o)
            continue
        for v in versions:
            try:
                kv.validate(o, v, strict=True)
                passed += 1
            except kv.ValidationError as e:
                problems.append(f"{where} (Kubernetes {v}): {'.'.join(map(str, e.path))}: {e.message}")
            except kv.SchemaNotFoundError as e:
                problems.append(f"{where}: {e.message}")
json.dump(crds, open(os.path.join(out, "crds.json"), "w"))
if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"{passed} object validations passed; {len(crds)} Prometheus operator objects go to their CRD schemas")
PY

echo "==> Prometheus operator CRD schemas (@kubernetes-models/prometheus-operator)"
node "$NODE_DIR/validate.mjs" <"$OUT/crds.json"

echo "==> keel validate --skip-files, on the policy in each rendered ConfigMap"
for overlay in dev production; do
  [ -f "$OUT/$overlay.policy.toml" ] || { echo "no policy.toml ConfigMap in the $overlay overlay" >&2; exit 1; }
  # --skip-files: the TLS files are the Secret's, mounted only where Keel runs; every other
  # rule is checked.
  "$KEEL" validate --skip-files "$OUT/$overlay.policy.toml" | sed -n 1,2p
done

echo "==> promtool check rules, on the rendered PrometheusRule"
rules=$(ls "$OUT"/*.rules.yml 2>/dev/null || true)
[ -n "$rules" ] || { echo "no PrometheusRule rendered" >&2; exit 1; }
# shellcheck disable=SC2086
promtool check rules $rules

echo "==> hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" --no-color deploy/Dockerfile && echo "deploy/Dockerfile: no findings"

echo "==> Dockerfile, manifests, policy and Keel's defaults agree (cargo test --test deploy)"
cargo test --quiet --test deploy

echo "==> Kubernetes manifests OK"
