#!/usr/bin/env bash
# Make sure a `mosquitto` binary exists for the tests. Installs Debian's package when we are root
# with apt-get; otherwise says exactly what is missing. NO_INSTALL=1 never installs: a missing
# broker is then an error naming the package. The binary is looked for on PATH and in
# ENSURE_EXTRA_PATH (default /usr/sbin, where Debian puts it, often off a user's PATH).
set -euo pipefail
extra=${ENSURE_EXTRA_PATH-/usr/sbin}
if PATH="$PATH${extra:+:$extra}" command -v mosquitto >/dev/null 2>&1; then
  exit 0
fi
if [ "${NO_INSTALL:-}" = "1" ]; then
  echo "error: the tests need the 'mosquitto' broker binary, and NO_INSTALL=1 forbids installing" >&2
  echo "       it: install Debian's 'mosquitto' package (apt-get install mosquitto) and run again." >&2
  exit 1
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing Debian's package (NO_INSTALL=1 to refuse)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  exit 0
fi
echo "error: the tests need the 'mosquitto' broker binary (Debian/Ubuntu: apt-get install mosquitto;" >&2
echo "       macOS: brew install mosquitto). Install it and run 'make test' again." >&2
exit 1
