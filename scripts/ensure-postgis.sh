#!/usr/bin/env bash
# PostGIS for the tests of the mirror's spatial objects (device_track's geom column and its
# index), which run against the machine's PostgreSQL with the extension and without it.
# Installs Debian's postgresql-<major>-postgis-3 for the server on 127.0.0.1:5432 when we are
# root with apt-get and the server lacks it. PostGIS is optional for the mirror: without it
# those tests are skipped, each saying why, and everything else runs. NO_INSTALL=1 never
# installs: the package is named, and those tests are skipped.
set -euo pipefail
host=${PGHOST:-127.0.0.1}
user=${PGUSER:-postgres}
query() { psql -h "$host" -U "$user" -d postgres -Atqc "$1" 2>/dev/null; }
major=$(query "SELECT current_setting('server_version_num')::int / 10000") || {
  echo "note: no PostgreSQL answers on $host:5432; the PostGIS tests will be skipped" >&2
  exit 0
}
if [ "$(query "SELECT count(*) FROM pg_available_extensions WHERE name = 'postgis'")" = "1" ]; then
  exit 0
fi
package="postgresql-$major-postgis-3"
if [ "${NO_INSTALL:-}" = "1" ]; then
  echo "note: PostGIS is not installed for PostgreSQL $major and NO_INSTALL=1 forbids installing" >&2
  echo "      Debian's '$package' (apt-get install $package): the PostGIS tests will be skipped." >&2
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "PostGIS not found for PostgreSQL $major: installing Debian's '$package' (NO_INSTALL=1 to refuse)" >&2
  apt-get update -qq
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" >/dev/null; then
    exit 0
  fi
fi
echo "note: PostGIS is not installed for PostgreSQL $major ($package); the PostGIS tests will be" >&2
echo "      skipped. Install it to run them." >&2
exit 0
