#!/usr/bin/env bash
# Installs the etcd server the sealed-state store's tests run a 3-member cluster of
# (tests/src/etcd.rs expects /usr/bin/etcd): Debian's etcd-server, with apt-get. Quiet;
# idempotent: does nothing when /usr/bin/etcd is present.
set -euo pipefail

if [ -x /usr/bin/etcd ]; then
  echo "etcd-deps: $(/usr/bin/etcd --version | head -n 1)"
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo"
fi
for attempt in 1 2 3; do
  if $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; then
    echo "etcd-deps: $(/usr/bin/etcd --version | head -n 1)"
    exit 0
  fi
  echo "etcd-deps: apt-get install etcd-server failed (attempt $attempt of 3)" >&2
  sleep $((attempt * 5))
done
echo "etcd-deps: could not install etcd-server" >&2
exit 1
