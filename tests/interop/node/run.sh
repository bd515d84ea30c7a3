#!/usr/bin/env bash
# Node.js interop: @grpc/grpc-js with @grpc/proto-loader on Keel's own protos, against a
# release build of Keel (tests/interop/node/keel_client.test.js, node's test runner).
#
#   tests/interop/node/run.sh          # from any directory
#
# Needs Rust, Node.js 20 or newer with npm, and the npm registry (Node.js and npm come from
# Debian's packages when missing). The pinned packages (package-lock.json) are installed with
# `npm ci` into target/interop-node, reused while package.json, package-lock.json and the Node
# version are unchanged. Exit code: 0 if every test passed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
HERE=tests/interop/node
NODE_DIR=target/interop-node
STAMP=$NODE_DIR/.stamp
KEEL=${CARGO_TARGET_DIR:-target}/release/keel

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "==> installing nodejs and npm (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if (( major < 20 )); then
    echo "error: node $(node --version) is too old; the test needs Node.js 20 or newer" >&2
    exit 2
fi
echo "==> node $(node --version), npm $(npm --version)"

# What node_modules was built from: the package files and Node's version.
want="$(cat "$HERE/package.json" "$HERE/package-lock.json" | sha256sum | cut -d' ' -f1) $(node --version)"
if [[ -d $NODE_DIR/node_modules && -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    echo "==> reusing $NODE_DIR (package-lock.json unchanged)"
else
    echo "==> installing $HERE/package-lock.json into $NODE_DIR (npm ci)"
    rm -rf "$NODE_DIR"
    mkdir -p "$NODE_DIR"
    cp "$HERE/package.json" "$HERE/package-lock.json" "$NODE_DIR/"
    # No install scripts: the packages are plain JavaScript and need none.
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
    # Written last, so an interrupted install is redone next time.
    echo "$want" >"$STAMP"
fi

echo "==> building keel (cargo build --release --bin keel)"
cargo build --release --bin keel

echo "==> running $HERE/keel_client.test.js against $KEEL"
KEEL_BINARY=$KEEL NODE_PATH=$PWD/$NODE_DIR/node_modules exec node --test "$HERE/keel_client.test.js"
