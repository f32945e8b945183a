#!/usr/bin/env bash
# Make sure a `promtool` binary exists for the tests (metrics lint, alert rules and their unit
# tests, dashboard PromQL). Installs Debian's `prometheus` package, which ships
# /usr/bin/promtool, when we are root with apt-get; otherwise says exactly what is missing.
#
# Installing the package must not leave a Prometheus server running next to the tests: while
# it installs, a policy-rc.d that refuses every service start is put in place (unless the
# machine already has one, as Docker images do), and recommended packages
# (prometheus-node-exporter) are not installed. On a systemd host the unit is still enabled
# for the next boot; stop it with `systemctl disable --now prometheus` if that is unwanted.
#
# NO_INSTALL=1 never installs: a missing promtool is then an error naming the package. The
# binary is looked for on PATH and in ENSURE_EXTRA_PATH (default /usr/bin).
set -euo pipefail

extra=${ENSURE_EXTRA_PATH-/usr/bin}
if PATH="$PATH${extra:+:$extra}" command -v promtool >/dev/null 2>&1; then
  exit 0
fi

if [ "${NO_INSTALL:-}" = "1" ]; then
  echo "error: the tests need Prometheus' 'promtool' binary, and NO_INSTALL=1 forbids installing" >&2
  echo "       it: install Debian's 'prometheus' package (apt-get install prometheus; it ships" >&2
  echo "       /usr/bin/promtool), or put promtool from a Prometheus release on PATH, and run again." >&2
  exit 1
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "promtool not found: installing Debian's 'prometheus' package (it ships /usr/bin/promtool;" >&2
  echo "NO_INSTALL=1 to refuse)" >&2
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# temporary, from scripts/ensure-promtool.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if ! [ -x /usr/bin/promtool ]; then
    echo "error: the 'prometheus' package was installed but /usr/bin/promtool is missing" >&2
    exit 1
  fi
  exit 0
fi

echo "error: the tests need Prometheus' 'promtool' binary (Debian/Ubuntu: apt-get install prometheus;" >&2
echo "       other systems: the prometheus release tarball from https://prometheus.io/download/," >&2
echo "       or 'brew install prometheus'). Put promtool on PATH and run 'make test' again." >&2
exit 1
