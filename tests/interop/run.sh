#!/usr/bin/env bash
# Interop suites against a release build of Keel:
#   test_interop.py   Triton's own Python client (tritonclient), grpc.health.v1 and gRPC
#                     reflection clients, on Keel's embedded models;
#   test_mlserver.py  tritonclient through Keel to a real MLServer serving a scikit-learn
#                     model trained at the start (MLServer from PyPI, in the same venv).
# The Node.js client has its own script, tests/interop/node/run.sh.
#
#   tests/interop/run.sh              # from any directory
#   tests/interop/run.sh -k stream    # only tests whose name contains "stream" (both suites)
#
# Needs Rust, python3 (3.11 or 3.12, with venv and pip: MLServer 1.7 needs Python < 3.13)
# and PyPI. The virtualenv lives in target/interop-venv and is reused while requirements.txt
# and the Python version are unchanged. Set PYTHON to choose the interpreter. Exit code: 0
# if every test of both suites passed (the second suite runs even when the first fails).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-python3}
VENV=target/interop-venv
REQUIREMENTS=tests/interop/requirements.txt
STAMP=$VENV/.requirements-stamp
KEEL=${CARGO_TARGET_DIR:-target}/release/keel

# What the venv was built from: the requirements file and the interpreter's version.
want=$("$PYTHON" - "$REQUIREMENTS" <<'PY'
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest(), sys.version.split()[0])
PY
)
if ! "$PYTHON" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
    echo "error: $("$PYTHON" --version) here; the interop venv needs Python 3.11 or 3.12" \
         "(MLServer 1.7 supports < 3.13). Set PYTHON to another interpreter." >&2
    exit 2
fi

if [[ -x $VENV/bin/python && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    echo "==> reusing virtualenv $VENV (requirements unchanged)"
else
    echo "==> creating virtualenv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    echo "==> installing $REQUIREMENTS"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$REQUIREMENTS"
    # Written last, so an interrupted install is redone next time.
    echo "$want" >"$STAMP"
fi

echo "==> building keel (cargo build --release --bin keel)"
cargo build --release --bin keel

status=0
for suite in test_interop test_mlserver; do
    echo "==> running tests/interop/$suite.py against $KEEL ($(date -u +%H:%M:%S))"
    "$VENV/bin/python" "tests/interop/$suite.py" --keel "$KEEL" "$@" || status=1
done
exit $status
