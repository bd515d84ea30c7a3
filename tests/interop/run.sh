#!/usr/bin/env bash
# Interop suite: Triton's own Python client (tritonclient), grpc.health.v1 and gRPC
# reflection clients against a release build of Keel.
#
#   tests/interop/run.sh              # from any directory
#   tests/interop/run.sh -k stream    # only tests whose name contains "stream"
#
# Needs Rust, python3 (3.11 or newer, with venv and pip) and PyPI. The virtualenv lives in
# target/interop-venv and is reused while requirements.txt and the Python version are
# unchanged. Set PYTHON to choose the interpreter. Exit code: 0 if every test passed.
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

echo "==> running tests/interop/test_interop.py against $KEEL"
exec "$VENV/bin/python" tests/interop/test_interop.py --keel "$KEEL" "$@"
