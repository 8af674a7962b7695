#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's Prometheus server
# (real scrapes and PromQL checks). Java 17 and Maven are expected on the machine.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "installing Debian's prometheus package (for the monitoring checks)..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts a system service on Debian; the tests run their own server.
$SUDO systemctl stop prometheus 2>/dev/null || $SUDO service prometheus stop 2>/dev/null || true
command -v prometheus >/dev/null && command -v promtool >/dev/null
