"""The message mix every scenario uses, and the MQTT plumbing around it.

Mix (deterministic, indexed by message number ``i``):

* 95 % telemetry state updates ``flespi/state/gw/devices/{id}/telemetry/{param}`` over
  ``devices`` devices x 50 parameters, each a bare numeric JSON value;
* 5 % device messages ``flespi/message/gw/devices/{id}``: a flat JSON object with dotted keys
  (~350 bytes), as flespi sends them.

Every publication carries flespi's MQTT 5 user properties ``cid`` and ``timestamp``.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

CID = "123"
PARAMS = (
    "position.latitude",
    "position.longitude",
    "position.altitude",
    "position.speed",
    "position.direction",
    "position.satellites",
    "position.hdop",
    "battery.voltage",
    "battery.level",
    "external.powersource.voltage",
    "gsm.signal.level",
    "gnss.fix",
    "engine.ignition.status",
    "engine.rpm",
    "can.engine.temperature",
    "can.fuel.level",
    "can.vehicle.mileage",
    "vehicle.mileage",
    "movement.status",
    "din",
    "dout",
    *(f"sensor.{n}.value" for n in range(1, 30)),
)
assert len(PARAMS) == 50
MESSAGE_EVERY = 20  # every 20th message is a device message (5 %)
# The mirror's default subscription filters (mirror.config.DEFAULT_TOPICS).
MIRROR_TOPICS = ("flespi/state/#", "flespi/message/#", "flespi/interval/#")


@dataclass(frozen=True)
class Mix:
    devices: int = 1000
    retained: bool = False  # the retained snapshot: telemetry only, every key once

    def telemetry_keys(self) -> int:
        return self.devices * len(PARAMS)

    def message(self, i: int, rnd: random.Random, now: float) -> tuple[str, bytes]:
        if not self.retained and i % MESSAGE_EVERY == MESSAGE_EVERY - 1:
            device = 1000 + (i // MESSAGE_EVERY) % self.devices
            payload = {
                "ident": f"35{device:013d}",
                "timestamp": round(now - 1.5, 6),
                "server.timestamp": round(now, 6),
                "channel.id": 7,
                "device.id": device,
                "device.name": f"truck {device}",
                "device.type.id": 1272,
                "protocol.id": 200,
                "peer": "192.0.2.10:53312",
                "position.latitude": round(rnd.uniform(-60, 60), 6),
                "position.longitude": round(rnd.uniform(-170, 170), 6),
                "position.speed": rnd.randint(0, 120),
                "position.satellites": rnd.randint(4, 14),
                "battery.level": rnd.randint(0, 100),
                "engine.ignition.status": rnd.random() < 0.5,
                "msg.seq": i,
            }
            return f"flespi/message/gw/devices/{device}", json.dumps(payload).encode()
        key = i if self.retained else i - i // MESSAGE_EVERY
        key %= self.telemetry_keys()
        device = 1000 + key // len(PARAMS)
        param = PARAMS[key % len(PARAMS)]
        value = rnd.randint(0, 100000) if key % 3 == 0 else round(rnd.uniform(-1000, 1000), 6)
        return f"flespi/state/gw/devices/{device}/telemetry/{param}", json.dumps(value).encode()

    def expected(self, count: int) -> dict[str, int]:
        """Rows the mirror must hold after ``count`` messages (indices 0..count-1)."""
        if self.retained:
            return {"telemetry": min(count, self.telemetry_keys()), "device_messages": 0}
        messages = count // MESSAGE_EVERY
        return {
            "telemetry": min(count - messages, self.telemetry_keys()),
            "device_messages": messages,
        }


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def publish_properties(ts: float) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("cid", CID), ("timestamp", repr(ts))]
    return props


def new_client(client_id: str | None = None) -> mqtt.Client:
    return mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id or f"bench-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )


def prime_session(
    url: str, client_id: str, topics: tuple[str, ...] = MIRROR_TOPICS, expiry: int = 3600
) -> None:
    """Create the consumer's persistent session and its subscriptions, then leave.

    From then on the broker queues every matching QoS 1 publication for ``client_id`` until
    the consumer connects with clean start false: the backlog.
    """
    client = new_client(client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *_a: subscribed.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = expiry
    host, port = host_port(url)
    client.connect(host, port, clean_start=False, properties=props)
    client.loop_start()
    try:
        # retainHandling=1, as the mirror subscribes: no retained replay for an existing one.
        client.subscribe([(t, SubscribeOptions(qos=1, retainHandling=1)) for t in topics])
        if not subscribed.wait(10):
            raise RuntimeError(f"no SUBACK priming session {client_id}")
    finally:
        client.disconnect()
        client.loop_stop()


def session_queue_ready(url: str) -> None:
    """A round trip through the broker, so everything published before is queued."""
    client = new_client()
    host, port = host_port(url)
    client.connect(host, port)
    client.loop_start()
    try:
        info = client.publish("bench/barrier", b"", qos=1)
        info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()
