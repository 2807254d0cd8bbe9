#!/usr/bin/env bash
# The local demo: builds keygate and walks through attestation verification on the real
# AWS Nitro documents shipped in attestation/tests/vectors and on the mock NSM.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --locked --release --bin keygate >/dev/null 2>&1 || cargo build --locked --release --bin keygate
exec ./target/release/keygate demo "$@"
