"""Publish realistic flespi traffic to any MQTT broker, for demos, tests and load.

A real flespi account cannot be written to (the broker discards client publishes to `flespi/...`),
so the mirror is demonstrated, tested and benchmarked against a broker of our own fed by this
module. It speaks the same topics and payloads as flespi (see docs on the topic families): a
retained snapshot of every device's state first, then a live mix of telemetry, device and channel
messages, property changes, interval events, SMS and the odd deletion.

The traffic is deterministic for a given seed (what is published, in which order); only the
timestamps are real wall-clock time, as flespi's are.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

ACCOUNT_ID = 123456
FIRST_DEVICE_ID = 1_000_000  # device n (1-based) has id FIRST_DEVICE_ID + n
CHANNEL_ID = 5001
PLUGIN_ID = 7001
CALC_ID = 8001
MODEM_ID = 9001
DEVICE_TYPE_ID = 1272
PROTOCOL_ID = 200

FAMILIES = (
    "telemetry",
    "setting",
    "plugin_config",
    "object",
    "object_property",
    "interval",
    "device_message",
    "channel_message",
    "modem_message",
    "deletion",
)

MAX_IN_FLIGHT = 1000  # publishes sent but not yet acknowledged (PUBACK)
CONNECT_TIMEOUT = 10.0  # seconds to wait for the CONNACK
DRAIN_TIMEOUT = 30.0  # seconds to wait for the last PUBACKs
BURST_SECONDS = 1.0  # how much lost time the pacing may catch up on in a burst

# Live events and their weights: a device report publishes ~5 telemetry values plus the message
# seen by the device and by the channel, so telemetry makes up roughly 70% of the live publishes.
EVENT_WEIGHTS = {
    "report": 0.85,
    "property": 0.06,
    "interval": 0.05,
    "sms": 0.015,
    "setting": 0.01,
    "plugin_config": 0.005,
    "object": 0.005,
    "deletion": 0.005,
}
# The first live events cover every family once, so even a short demo fills every table.
OPENING_EVENTS = (
    "report",
    "property",
    "interval",
    "setting",
    "plugin_config",
    "object",
    "sms",
    "deletion",
    "interval",
    "interval_deleted",
)
DELETABLE_PARAMS = ("din", "engine.ignition.status", "gsm.signal.level")
SMS_TEXTS = ("ALARM SOS", "STATUS OK", "Low battery", "Door opened", "Ignition on", "GPS lost")
NAME_KINDS = ("truck", "van", "car")


@dataclass(frozen=True)
class SimulationOptions:
    mqtt_url: str = "mqtt://127.0.0.1:1883"  # mqtt:// or mqtts://
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    devices: int = 10
    rate: float = 100.0  # target live publishes per second overall; <= 0: as fast as possible
    duration: float = 10.0  # seconds of live traffic after the initial retained snapshot
    seed: int = 1
    client_id: str | None = None
    retained_snapshot: bool = True  # publish the initial retained state of every device first
    max_messages: int | None = None  # stop after this many live publishes, whichever comes first


@dataclass
class SimulationReport:
    published: int  # publishes acknowledged by the broker (PUBACK), snapshot included
    by_family: dict[str, int]  # acknowledged publishes per family (every family, zeros included)
    elapsed: float  # seconds, connect to last PUBACK


@dataclass(frozen=True)
class Publication:
    family: str
    topic: str
    payload: bytes  # b"" is a deletion
    retain: bool


@dataclass
class OpenInterval:
    id: int
    begin: int
    end: int
    mileage: float
    max_speed: int


@dataclass
class SimulatedDevice:
    index: int  # 1-based
    latitude: float
    longitude: float
    heading: float
    speed: float
    battery: float
    ignition: bool = True
    din: int = 0
    connected: bool = True
    name_kind: str = "truck"
    interval: OpenInterval | None = None
    report_interval: int = 30

    @property
    def id(self) -> int:
        return FIRST_DEVICE_ID + self.index

    @property
    def ident(self) -> str:
        return f"35{self.index:012d}"

    @property
    def name(self) -> str:
        return f"{self.name_kind}-{self.index}"

    @property
    def phone(self) -> str:
        return f"3706{self.index:07d}"


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class TrafficGenerator:
    """What flespi would publish for an account of simulated devices; no I/O."""

    def __init__(self, devices: int, seed: int, clock: Callable[[], float] = time.time) -> None:
        self.rng = random.Random(seed)
        self.clock = clock
        self.next_interval_id = 1
        self.devices = [
            SimulatedDevice(
                index=n,
                latitude=54.687 + self.rng.uniform(-0.3, 0.3),
                longitude=25.279 + self.rng.uniform(-0.5, 0.5),
                heading=self.rng.uniform(0, 360),
                speed=self.rng.uniform(0, 90),
                battery=self.rng.uniform(60, 100),
                name_kind=self.rng.choice(NAME_KINDS),
            )
            for n in range(1, devices + 1)
        ]

    # -- topics ----------------------------------------------------------------------------------

    @staticmethod
    def _state(device: SimulatedDevice, suffix: str = "") -> str:
        return f"flespi/state/gw/devices/{device.id}{suffix}"

    def _telemetry(self, device: SimulatedDevice, param: str, value: Any) -> Publication:
        topic = self._state(device, f"/telemetry/{param}")
        return Publication("telemetry", topic, _json(value), True)

    # -- payloads --------------------------------------------------------------------------------

    def _object(self, device: SimulatedDevice) -> dict[str, Any]:
        return {
            "id": device.id,
            "name": device.name,
            "cid": ACCOUNT_ID,
            "device_type_id": DEVICE_TYPE_ID,
            "protocol_id": PROTOCOL_ID,
            "configuration": {"ident": device.ident},
            "messages_ttl": 31536000,
        }

    def _position(self, device: SimulatedDevice) -> dict[str, Any]:
        return {
            "latitude": round(device.latitude, 6),
            "longitude": round(device.longitude, 6),
            "altitude": 112 + (device.index % 40),
            "direction": round(device.heading),
            "speed": round(device.speed),
            "satellites": 6 + device.index % 9,
            "hdop": 0.9,
            "valid": True,
        }

    def _telemetry_snapshot(self, device: SimulatedDevice, now: float) -> dict[str, Any]:
        position = self._position(device)
        return {
            "position": position,
            "position.latitude": position["latitude"],
            "position.longitude": position["longitude"],
            "position.altitude": position["altitude"],
            "position.speed": position["speed"],
            "position.direction": position["direction"],
            "position.valid": True,
            "battery.level": round(device.battery),
            "engine.ignition.status": device.ignition,
            "din": device.din,
            "gsm.signal.level": 60 + device.index % 40,
            "ident": device.ident,
            "timestamp": round(now, 6),
        }

    def _plugin_config(self, device: SimulatedDevice) -> dict[str, Any]:
        return {"enabled": True, "speed_limit": 90 + 10 * (device.index % 3), "geofence": "depot"}

    # -- the snapshot ----------------------------------------------------------------------------

    def snapshot(self) -> Iterator[Publication]:
        """The retained state a subscriber finds when it connects to flespi."""
        for device in self.devices:
            now = self.clock()
            yield Publication("object", self._state(device), _json(self._object(device)), True)
            yield Publication(
                "object_property", self._state(device, "/connected"), _json(device.connected), True
            )
            yield Publication(
                "object_property", self._state(device, "/last_active"), _json(int(now)), True
            )
            for param, value in self._telemetry_snapshot(device, now).items():
                yield self._telemetry(device, param, value)
            yield self._setting(device)
            yield Publication(
                "setting",
                self._state(device, "/settings/sms_notifications"),
                _json({"enabled": False}),
                True,
            )
            yield Publication(
                "plugin_config",
                f"flespi/state/gw/plugins/{PLUGIN_ID}/devices/{device.id}",
                _json(self._plugin_config(device)),
                True,
            )

    # -- live traffic ----------------------------------------------------------------------------

    def live(self) -> Iterator[Publication]:
        """An endless mix of live events; the first ones cover every family."""
        kinds = list(EVENT_WEIGHTS)
        weights = list(EVENT_WEIGHTS.values())
        for kind in OPENING_EVENTS:
            yield from self._event(kind, self.devices[0])
        while True:
            kind = self.rng.choices(kinds, weights)[0]
            yield from self._event(kind, self.rng.choice(self.devices))

    def _event(self, kind: str, device: SimulatedDevice) -> Iterator[Publication]:
        if kind == "report":
            yield from self._report(device)
        elif kind == "property":
            yield from self._property(device)
        elif kind == "interval":
            yield self._interval(device, deleting=False)
        elif kind == "interval_deleted":
            yield self._interval(device, deleting=True)
        elif kind == "sms":
            yield self._sms(device)
        elif kind == "setting":
            device.report_interval = self.rng.choice((10, 30, 60, 120))
            yield self._setting(device)
        elif kind == "plugin_config":
            config = self._plugin_config(device) | {"enabled": self.rng.random() < 0.8}
            topic = f"flespi/state/gw/plugins/{PLUGIN_ID}/devices/{device.id}"
            yield Publication("plugin_config", topic, _json(config), True)
        elif kind == "object":
            device.name_kind = self.rng.choice(NAME_KINDS)
            yield Publication("object", self._state(device), _json(self._object(device)), True)
            name_topic = self._state(device, "/name")
            yield Publication("object_property", name_topic, _json(device.name), True)
        elif kind == "deletion":
            param = self.rng.choice(DELETABLE_PARAMS)
            yield Publication("deletion", self._state(device, f"/telemetry/{param}"), b"", True)
        else:
            raise ValueError(f"unknown simulated event {kind!r}")

    def _setting(self, device: SimulatedDevice) -> Publication:
        return Publication(
            "setting",
            self._state(device, "/settings/report_interval"),
            _json({"interval": device.report_interval}),
            True,
        )

    def _move(self, device: SimulatedDevice) -> None:
        """Drive on for one nominal report period (fixed, so positions follow the seed only)."""
        rng = self.rng
        device.heading = (device.heading + rng.uniform(-25, 25)) % 360
        device.speed = min(130.0, max(0.0, device.speed + rng.uniform(-12, 12)))
        step = device.speed / 3600 * 10 / 111.0  # 10 s at this speed, in degrees (roughly)
        device.latitude += step * _cos_deg(device.heading)
        device.longitude += step * _sin_deg(device.heading) * 1.7
        if rng.random() < 0.03:
            device.ignition = not device.ignition
        charge = 0.3 if device.ignition else -0.2
        device.battery = min(100.0, max(5.0, device.battery + charge + rng.uniform(-0.3, 0.1)))

    def _report(self, device: SimulatedDevice) -> Iterator[Publication]:
        rng = self.rng
        self._move(device)
        now = self.clock()
        delay = rng.uniform(0.2, 3.0)
        peer_port = rng.randrange(40000, 60000)
        position = self._position(device)
        yield self._telemetry(device, "position", position)
        yield self._telemetry(device, "position.latitude", position["latitude"])
        yield self._telemetry(device, "position.longitude", position["longitude"])
        yield self._telemetry(device, "position.speed", position["speed"])
        yield self._telemetry(device, "battery.level", round(device.battery))
        if rng.random() < 0.1:
            device.din = rng.randrange(16)
            yield self._telemetry(device, "din", device.din)
        message = {
            "ident": device.ident,
            "timestamp": round(now - delay, 6),
            "server.timestamp": round(now, 6),
            "channel.id": CHANNEL_ID,
            "device.id": device.id,
            "device.name": device.name,
            "device.type.id": DEVICE_TYPE_ID,
            "protocol.id": PROTOCOL_ID,
            "peer": f"10.20.{device.index // 250 % 250}.{device.index % 250}:{peer_port}",
            "position.latitude": position["latitude"],
            "position.longitude": position["longitude"],
            "position.altitude": position["altitude"],
            "position.direction": position["direction"],
            "position.speed": position["speed"],
            "position.satellites": position["satellites"],
            "position.valid": True,
            "battery.level": round(device.battery),
            "engine.ignition.status": device.ignition,
            "din": device.din,
        }
        payload = _json(message)
        device_topic = f"flespi/message/gw/devices/{device.id}"
        channel_topic = f"flespi/message/gw/channels/{CHANNEL_ID}/{device.ident}"
        yield Publication("device_message", device_topic, payload, False)
        yield Publication("channel_message", channel_topic, payload, False)

    def _property(self, device: SimulatedDevice) -> Iterator[Publication]:
        if self.rng.random() < 0.2:
            device.connected = not device.connected
            yield Publication(
                "object_property", self._state(device, "/connected"), _json(device.connected), True
            )
        yield Publication(
            "object_property", self._state(device, "/last_active"), _json(int(self.clock())), True
        )

    def _interval(self, device: SimulatedDevice, *, deleting: bool) -> Publication:
        """created opens an interval, updated extends its end, deleted drops it (same id, begin)."""
        rng = self.rng
        now = self.clock()
        interval = device.interval
        roll = rng.random()
        if deleting and interval is not None:
            event = "deleted"
            device.interval = None
        elif interval is None or roll < 0.25:
            event = "created"
            begin = int(now) - rng.randint(60, 600)
            interval = OpenInterval(
                self.next_interval_id, begin, int(now), rng.uniform(0.5, 5.0), rng.randint(20, 90)
            )
            self.next_interval_id += 1
            device.interval = interval
        elif roll < 0.93:
            event = "updated"
            interval.end = max(int(now), interval.end + 1)
            interval.mileage += rng.uniform(0.1, 3.0)
            interval.max_speed = max(interval.max_speed, rng.randint(20, 120))
        else:
            event = "deleted"
            device.interval = None
        payload = {
            "id": interval.id,
            "begin": interval.begin,
            "end": interval.end,
            "duration": interval.end - interval.begin,
            "timestamp": round(now, 6),
            "mileage": round(interval.mileage, 1),
            "max_speed": interval.max_speed,
        }
        topic = f"flespi/interval/gw/calcs/{CALC_ID}/devices/{device.id}/{event}"
        return Publication("interval", topic, _json(payload), False)

    def _sms(self, device: SimulatedDevice) -> Publication:
        payload = {
            "timestamp": round(self.clock(), 6),
            "text": self.rng.choice(SMS_TEXTS),
            "phone": f"+{device.phone}",
        }
        topic = f"flespi/message/gw/modems/{MODEM_ID}/{device.phone}"
        return Publication("modem_message", topic, _json(payload), False)


def _cos_deg(degrees: float) -> float:
    return math.cos(math.radians(degrees))


def _sin_deg(degrees: float) -> float:
    return math.sin(math.radians(degrees))


# ------------------------------------------------------------------------------------------------
# The MQTT side


def _broker_address(url: str) -> tuple[str, int, bool]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL must start with mqtt:// or mqtts://, not {parts.scheme!r}://")
    if not parts.hostname:
        raise ValueError("MQTT URL has no host")
    tls = parts.scheme == "mqtts"
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class AcknowledgedPublisher:
    """A paho MQTT 5 session that publishes at QoS 1 with a bounded window and counts PUBACKs."""

    def __init__(self, options: SimulationOptions) -> None:
        host, port, tls = _broker_address(options.mqtt_url)
        self.address = f"{host}:{port}"
        self._host, self._port = host, port
        client_id = options.client_id or f"flespi-mirror-simulate-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if options.username is not None or options.password is not None:
            self.client.username_pw_set(options.username or "", options.password)
        # paho's own window (20 by default) would throttle us; ours below bounds it instead.
        self.client.max_inflight_messages_set(MAX_IN_FLIGHT)
        if tls:
            self.client.tls_set()  # the system's CAs, certificate and host name verified
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._changed = threading.Condition()
        self._connected = False
        self._closing = False
        self._failure: str | None = None
        self.window = MAX_IN_FLIGHT  # lowered to the broker's Receive Maximum on CONNACK
        self._pending: dict[int, str] = {}  # mid -> family, sent and not yet acknowledged
        self._early_acks: dict[int, bool] = {}  # PUBACKs that beat publish() returning the mid
        self.by_family = dict.fromkeys(FAMILIES, 0)
        self.published = 0
        self.refused = 0

    # -- callbacks (paho's network thread) ----------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            if reason_code.is_failure:
                self._failure = f"broker {self.address} refused the connection: {reason_code}"
            else:
                receive_maximum = getattr(properties, "ReceiveMaximum", MAX_IN_FLIGHT)
                self.window = max(1, min(MAX_IN_FLIGHT, int(receive_maximum)))
                self._connected = True
            self._changed.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._changed:
            if not self._closing and self._failure is None:
                self._failure = f"lost the connection to broker {self.address}: {reason_code}"
            self._changed.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        accepted = not reason_code.is_failure
        with self._changed:
            family = self._pending.pop(mid, None)
            if family is None:
                self._early_acks[mid] = accepted
            else:
                self._count(family, accepted)
            self._changed.notify_all()

    def _count(self, family: str, accepted: bool) -> None:
        if accepted:
            self.published += 1
            self.by_family[family] += 1
        else:
            self.refused += 1

    # -- the session ----------------------------------------------------------------------------

    def connect(self) -> None:
        try:
            self.client.connect(self._host, self._port, keepalive=30, clean_start=True)
        except OSError as exc:  # refused, unreachable, DNS, TLS verification, timeout
            raise RuntimeError(f"cannot reach MQTT broker {self.address}: {exc}") from None
        self.client.loop_start()
        with self._changed:
            self._changed.wait_for(
                lambda: self._connected or self._failure is not None, CONNECT_TIMEOUT
            )
            failure = self._failure
            if failure is None and not self._connected:
                failure = f"broker {self.address} sent no CONNACK within {CONNECT_TIMEOUT:.0f}s"
        if failure is not None:
            self.close()  # or paho's thread would keep reconnecting in the background
            raise RuntimeError(failure)

    def publish(self, publication: Publication) -> None:
        """Send one QoS 1 publish; block only while the window of unacknowledged ones is full."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._pending) < self.window or self._failure is not None
            )
            if self._failure is not None:
                raise RuntimeError(self._failure)
        # paho's Properties.__init__ has no annotations
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [("timestamp", f"{time.time():.6f}"), ("cid", str(ACCOUNT_ID))]
        info = self.client.publish(
            publication.topic,
            publication.payload,
            qos=1,
            retain=publication.retain,
            properties=properties,
        )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise RuntimeError(
                f"publish to broker {self.address} failed: {mqtt.error_string(info.rc)}"
            )
        with self._changed:
            if info.mid in self._early_acks:
                self._count(publication.family, self._early_acks.pop(info.mid))
            else:
                self._pending[info.mid] = publication.family

    def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Wait until the broker has acknowledged every publish."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending or self._failure is not None, timeout)
            if self._failure is not None:
                raise RuntimeError(self._failure)
            if self._pending:
                raise RuntimeError(
                    f"broker {self.address} did not acknowledge {len(self._pending)} publishes "
                    f"within {timeout:.0f}s"
                )

    def close(self) -> None:
        with self._changed:
            self._closing = True
        self.client.disconnect()
        self.client.loop_stop()


def run_simulation(
    options: SimulationOptions, *, stop: threading.Event | None = None
) -> SimulationReport:
    """Publish the retained snapshot, then live traffic until duration, max_messages or stop."""
    if not 1 <= options.devices <= 999_999:
        raise ValueError("devices must be between 1 and 999999")
    if options.duration < 0:
        raise ValueError("duration must not be negative")
    if options.max_messages is not None and options.max_messages < 0:
        raise ValueError("max_messages must not be negative")
    stop = stop or threading.Event()
    started = time.monotonic()
    traffic = TrafficGenerator(options.devices, options.seed)
    publisher = AcknowledgedPublisher(options)
    publisher.connect()
    try:
        if options.retained_snapshot:
            for publication in traffic.snapshot():
                if stop.is_set():
                    break
                publisher.publish(publication)
        live = _publish_live(publisher, traffic, options, stop)
        publisher.drain()
    finally:
        publisher.close()
    elapsed = time.monotonic() - started
    if publisher.refused:
        log.warning("broker %s refused %d publishes", publisher.address, publisher.refused)
    log.info(
        "simulated %d publishes (%d live) to %s in %.1fs",
        publisher.published,
        live,
        publisher.address,
        elapsed,
    )
    return SimulationReport(publisher.published, dict(publisher.by_family), elapsed)


def _publish_live(
    publisher: AcknowledgedPublisher,
    traffic: TrafficGenerator,
    options: SimulationOptions,
    stop: threading.Event,
) -> int:
    """Pace live publishes at options.rate (a schedule that may catch up one second in a burst)."""
    interval = 1.0 / options.rate if options.rate > 0 else 0.0
    start = time.monotonic()
    deadline = start + options.duration
    next_due = start
    sent = 0
    for publication in traffic.live():
        if options.max_messages is not None and sent >= options.max_messages:
            break
        now = time.monotonic()
        if now >= deadline or stop.is_set():
            break
        if interval:
            if next_due > now:
                if stop.wait(min(next_due, deadline) - now) or time.monotonic() >= deadline:
                    break
                now = time.monotonic()
            next_due = max(next_due, now - BURST_SECONDS) + interval
        publisher.publish(publication)
        sent += 1
    return sent
