#!/usr/bin/env bash
# Side-by-side COSE_Sign1 verification: AWS's aws-nitro-enclaves-cose (OpenSSL) and keygate,
# on the same real Nitro document. Needs libssl-dev. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")"
cargo run --release --quiet -- "$@"
