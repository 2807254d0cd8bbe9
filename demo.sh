#!/usr/bin/env bash
# The local demo: builds keygate and walks through the full flow on the mock NSM: attestation
# verification (real AWS documents and mock ones), then key release through a real KRE and proxy.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --locked --release --workspace --bins
exec ./target/release/keygate demo "$@"
