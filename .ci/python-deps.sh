#!/usr/bin/env bash
# Installs the Python packages the end-to-end tests' independent KMS v2 client needs
# (tests/python/kms_client.py): grpcio and grpcio-tools, from PyPI. Quiet; retried, since a
# registry hiccup should not fail CI. Idempotent: does nothing when both are importable.
set -euo pipefail

if python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "python-deps: grpcio and grpcio-tools present"
  exit 0
fi
for attempt in 1 2 3; do
  if python3 -m pip install --quiet --disable-pip-version-check --no-input grpcio grpcio-tools; then
    python3 -c 'import grpc, grpc_tools; print("python-deps: grpcio", grpc.__version__)'
    exit 0
  fi
  echo "python-deps: pip install failed (attempt $attempt of 3)" >&2
  sleep $((attempt * 5))
done
echo "python-deps: could not install grpcio and grpcio-tools" >&2
exit 1
