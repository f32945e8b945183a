#!/usr/bin/env bash
# Make sure a `mosquitto` binary exists for the tests. Installs Debian's package when we are root
# with apt-get; otherwise says exactly what is missing.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing Debian's package" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  exit 0
fi
echo "error: the tests need the 'mosquitto' broker binary (Debian/Ubuntu: apt-get install mosquitto;" >&2
echo "       macOS: brew install mosquitto). Install it and run 'make test' again." >&2
exit 1
