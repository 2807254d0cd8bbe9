#!/usr/bin/env bash
# Installs the Python packages the end-to-end tests' independent clients need: grpcio and
# grpcio-tools for the KMS v2 client (tests/python/kms_client.py), prometheus_client for its
# Prometheus text-format parser (the kms-plugin's /metrics), from PyPI. Quiet; retried, since a
# registry hiccup should not fail CI. Idempotent: does nothing when all are importable.
set -euo pipefail

if python3 -c 'import grpc, grpc_tools, prometheus_client' 2>/dev/null; then
  echo "python-deps: grpcio, grpcio-tools and prometheus_client present"
  exit 0
fi
for attempt in 1 2 3; do
  if python3 -m pip install --quiet --disable-pip-version-check --no-input grpcio grpcio-tools prometheus_client; then
    python3 -c 'import grpc, grpc_tools, prometheus_client; print("python-deps: grpcio", grpc.__version__)'
    exit 0
  fi
  echo "python-deps: pip install failed (attempt $attempt of 3)" >&2
  sleep $((attempt * 5))
done
echo "python-deps: could not install grpcio, grpcio-tools and prometheus_client" >&2
exit 1
