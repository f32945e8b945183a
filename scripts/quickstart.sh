#!/usr/bin/env bash
# The README's quick start (`make quickstart`): a private Mosquitto on a free port, the mirror
# against it, and, once the mirror says it is ready, simulated flespi traffic.
#
# The broker gets its own port on 127.0.0.1 (a Mosquitto already on 1883 is left alone), the
# mirror's /metrics another; simulate starts only when /readyz answers 200 (subscribed and the
# database writable), so no live message is published before the mirror listens.
# The mirror runs with --logs, so flespi's platform logs the simulation publishes fill
# platform_logs like every other table. Ctrl-C (or SIGTERM) stops the simulation, the mirror
# (which commits what it holds) and the broker, and ends with status 0: stopping is the way out.
# Environment (the README's quick start lists the same): MIRROR_DATABASE_URL (default: the
# embedded PostgreSQL), DEVICES (20), RATE (500), DURATION (30), QUICKSTART_KEEP_RUNNING (1: keep
# the mirror until Ctrl-C; 0: stop after the simulation).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

free_port() {
  "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

work=$(mktemp -d)
broker_pid=""
mirror_pid=""
stop_child() {
  # Ask a child to stop, and wait until it has (it may have seen Ctrl-C itself already).
  if [ -n "$1" ] && kill -TERM "$1" 2>/dev/null; then
    wait "$1" 2>/dev/null || true
  fi
}
cleanup() {
  stop_child "$mirror_pid"
  mirror_pid=""
  stop_child "$broker_pid"
  broker_pid=""
  rm -rf "$work"
}
interrupted() {
  trap '' INT TERM
  echo "quickstart: stopping the mirror and the broker"
  cleanup
  exit 0
}
trap cleanup EXIT
trap interrupted INT TERM

mqtt_port=$(free_port)
metrics_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\n' "$mqtt_port" > "$work/mosquitto.conf"
"$MOSQUITTO" -c "$work/mosquitto.conf" > "$work/mosquitto.log" 2>&1 &
broker_pid=$!
broker="mqtt://127.0.0.1:$mqtt_port"
echo "quickstart: Mosquitto on $broker (log $work/mosquitto.log)"

"$BIN/flespi-mirror" run --mqtt-url "$broker" --metrics-host 127.0.0.1 \
  --metrics-port "$metrics_port" --logs &
mirror_pid=$!

ready_url="http://127.0.0.1:$metrics_port/readyz"
"$BIN/python" - "$ready_url" "$mirror_pid" <<'PY'
import os, signal, sys, time, urllib.request
signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C: the script stops, quietly
url, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("quickstart: the mirror stopped before it was ready (see its log above)")
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                print(f"quickstart: the mirror is ready ({url})", flush=True)
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.3)
sys.exit(f"quickstart: the mirror was not ready after 180 s ({url})")
PY

"$BIN/flespi-mirror" simulate --mqtt-url "$broker" --devices "${DEVICES:-20}" \
  --rate "${RATE:-500}" --duration "${DURATION:-30}"

if [ "${QUICKSTART_KEEP_RUNNING:-1}" = "1" ]; then
  if [ -n "${MIRROR_DATABASE_URL:-}" ]; then
    where="psql on your MIRROR_DATABASE_URL, after SET search_path TO ${MIRROR_SCHEMA:-flespi};"
  else
    where="the psql line above;"
  fi
  echo "quickstart: the mirror keeps running; query it with $where Ctrl-C stops."
  wait "$mirror_pid"
fi
