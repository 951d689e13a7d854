#!/usr/bin/env bash
# System tools the test suite needs beyond Python wheels: promtool (Debian package
# `prometheus`) for the alert-rule tests, and Chromium (Debian package `chromium`) for the
# Billing page browser test (Playwright drives /usr/bin/chromium; its own browser download
# is not used), and pdftotext (Debian package `poppler-utils`) to read invoice PDFs as a
# person would. Idempotent; `make test` (and so .ci/run) calls it first.
set -euo pipefail

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
{ [ -x /usr/bin/chromium ] || [ -n "${BILLING_CHROMIUM:-}" ]; } || missing+=(chromium)
command -v pdftotext >/dev/null 2>&1 || missing+=(poppler-utils)
if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The prometheus package starts a server where systemd runs; CI only needs the binary.
    command -v promtool >/dev/null
    command -v pdftotext >/dev/null
    [ -x /usr/bin/chromium ] || [ -n "${BILLING_CHROMIUM:-}" ]
    exit 0
fi
echo "install-system-deps: missing ${missing[*]}; install with" >&2
echo "  sudo apt-get install --no-install-recommends ${missing[*]}   (Debian/Ubuntu)" >&2
echo "(promtool: or a binary from https://prometheus.io/download/ on PATH;" >&2
echo " chromium: or set BILLING_CHROMIUM to a Chromium/Chrome executable)" >&2
exit 1
