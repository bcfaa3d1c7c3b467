#!/usr/bin/env bash
# Installs Debian's `prometheus` package (the server and promtool) for the Prometheus-backed tests.
# Idempotent and quiet: does nothing when both binaries are already on PATH. Never fails `make test`: where it
# cannot install (no apt-get, not root and no passwordless sudo, no network) it says why, and the tests that need
# Prometheus skip with that reason locally and fail under CI=true (tests/prometheus_server.py).
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    exit 0
fi
say() { echo "install_prometheus: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get here: install Prometheus 2.x (prometheus and promtool on PATH) yourself to run those tests"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    say "not root and no passwordless sudo: run 'sudo apt-get install prometheus' to run those tests"
    exit 0
fi
was_active=$(systemctl is-active prometheus 2>/dev/null || true)
export DEBIAN_FRONTEND=noninteractive
if ! "${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
    # The package lists may be missing or old (a fresh container): refresh them once and try again.
    "${as_root[@]}" apt-get update -qq >/dev/null 2>&1
    if ! "${as_root[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
        say "apt-get install prometheus failed (no network or no such package?): those tests will say so"
        exit 0
    fi
fi
# The tests start their own Prometheus on a free loopback port; a system service the package started is not ours.
if [ "$was_active" != "active" ] && [ "$(systemctl is-active prometheus 2>/dev/null || true)" = "active" ]; then
    "${as_root[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null || say "installed, but prometheus/promtool not on PATH"
exit 0
