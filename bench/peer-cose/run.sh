#!/usr/bin/env bash
# Side-by-side verification of the same real Nitro document (doc-1, at its own time): AWS's
# aws-nitro-enclaves-cose (OpenSSL, COSE only), nsm-nitro-enclave-utils (chain + COSE) and keygate.
# Needs libssl-dev. Prints sanity lines (the peer accepts doc-1, refuses a tampered copy), then a
# markdown table.
set -euo pipefail
cd "$(dirname "$0")"
cargo run --release --quiet -- "$@"
