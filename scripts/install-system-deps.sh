#!/usr/bin/env bash
# System tools the test suite needs beyond Python wheels: promtool (Debian package
# `prometheus`) for the alert-rule tests. Idempotent; called by .ci/run before `make test`.
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package starts a Prometheus server where systemd runs; CI only needs the binary.
    command -v promtool >/dev/null
    exit 0
fi
echo "install-system-deps: promtool is missing; install it with" >&2
echo "  sudo apt-get install --no-install-recommends prometheus   (Debian/Ubuntu)" >&2
echo "or put a promtool binary from https://prometheus.io/download/ on PATH" >&2
exit 1
