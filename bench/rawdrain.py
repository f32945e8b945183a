"""The limit: a bare paho MQTT 5 client that only counts messages (no decode, no database).

``python -m bench.rawdrain --url URL --client-id ID --expect N [--subscribe]``

Without ``--subscribe`` it resumes the persistent session the benchmark primed (clean start
false), so the broker sends the queued backlog right after CONNACK. With ``--subscribe`` (the
retained snapshot) it starts a new session and subscribes to the mirror's filters, so the broker
sends every retained message. QoS 1 messages are acknowledged by paho's automatic ack, as soon as
each is parsed (the cheapest possible consumer). Prints one JSON line with the timings.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from bench.workload import MIRROR_TOPICS, host_port, new_client

IDLE_TIMEOUT = 20.0


def drain(url: str, client_id: str, expect: int, subscribe: bool) -> dict[str, Any]:
    client = new_client(client_id)
    state: dict[str, Any] = {"count": 0, "connected": None, "first": None, "last": None}
    last_seen = [time.monotonic()]

    def on_connect(c: Any, _u: Any, flags: Any, _reason: Any, _props: Any = None) -> None:
        state["connected"] = time.time()
        state["session_present"] = bool(flags.session_present)
        if subscribe:
            c.subscribe([(t, SubscribeOptions(qos=1)) for t in MIRROR_TOPICS])

    def on_message(c: Any, _u: Any, _message: Any) -> None:
        n = state["count"] = state["count"] + 1
        if n == 1:
            state["first"] = time.time()
        if n >= expect:
            state["last"] = time.time()
            c.disconnect()
        elif not n & 1023:
            last_seen[0] = time.monotonic()

    client.on_connect = on_connect
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if subscribe else 3600
    host, port = host_port(url)
    stop = threading.Event()

    def watchdog() -> None:
        while not stop.wait(1.0):
            if time.monotonic() - last_seen[0] > IDLE_TIMEOUT:
                client.disconnect()
                return

    threading.Thread(target=watchdog, daemon=True).start()
    started = time.time()
    client.connect(host, port, clean_start=subscribe, properties=props)
    client.loop_forever()
    stop.set()
    state["started"] = started
    if state["last"] is None:
        state["error"] = f"only {state['count']} of {expect} messages arrived"
    else:
        state["seconds"] = state["last"] - state["connected"]
        state["rate"] = expect / state["seconds"]
    return state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--expect", type=int, required=True)
    p.add_argument("--subscribe", action="store_true")
    a = p.parse_args()
    print(json.dumps(drain(a.url, a.client_id, a.expect, a.subscribe)), flush=True)


if __name__ == "__main__":
    main()
