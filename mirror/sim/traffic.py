"""The traffic of a simulated flespi account: what is published, in which order. Pure.

It speaks the same topics and payloads as flespi (see ``shared/flespi-mqtt.md`` and
``docs/flespi-shapes.md``): a retained snapshot of every device's state first, then a live mix
of telemetry (with message expiry), device and channel messages, device-time backlogs, property
changes (connections, account counters), calculator device state, interval and activation
events, SMS, platform logs, container messages and the odd deletion, for several subaccounts.
Deterministic for a given seed; only the timestamps are real wall-clock time, as flespi's are.
``simulate.py`` publishes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

ACCOUNT_ID = 123456  # the master account; devices belong to it and two subaccounts
ACCOUNTS = (ACCOUNT_ID, ACCOUNT_ID + 1, ACCOUNT_ID + 2)
FIRST_DEVICE_ID = 1_000_000  # device n (1-based) has id FIRST_DEVICE_ID + n
CHANNEL_ID = 5001
PLUGIN_ID = 7001
CALC_ID = 8001
# A calculator not in automated mode: its interval events carry no ``id`` (kb/mqtt-topics: the
# id is sent "in automated mode"); the even devices are assigned to it.
SPAN_CALC_ID = 8002
MODEM_ID = 9001
DEVICE_TYPE_ID = 1272
PROTOCOL_ID = 200
CONTAINER_ID = 6001
ABQUE_ID = 6101
GHOST_DEVICE_ID = 1_900_000  # devices created and deleted again, outside the fleet
TELEMETRY_EXPIRY = 370 * 86_400  # flespi keeps a parameter 370 days at most
GPS_ROLLOVER_SHIFT = 1024 * 7 * 86_400  # a GPS week rollover puts device time 1024 weeks back

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
    "calculator_device",
    "platform_log",
    "other_message",
)


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
    "backlog": 0.005,
    "calculator": 0.01,
    "connection": 0.01,
    "log": 0.01,
    "container": 0.003,
    "removal": 0.002,
    "stray": 0.005,
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
    "backlog",
    "calculator",
    "connection",
    "log",
    "container",
    "removal",
    "stray",
)
DELETABLE_PARAMS = ("din", "engine.ignition.status", "gsm.signal.level")
SMS_TEXTS = ("ALARM SOS", "STATUS OK", "Low battery", "Door opened", "Ignition on", "GPS lost")
NAME_KINDS = ("truck", "van", "car")


@dataclass(frozen=True)
class Publication:
    family: str
    topic: str
    payload: bytes  # b"" is a deletion
    retain: bool
    cid: int = ACCOUNT_ID  # the account it belongs to (the cid user property)
    expiry: int | None = None  # MQTT 5 message expiry, seconds
    # User properties besides timestamp and cid (a calculator's last: 'active').
    properties: tuple[tuple[str, str], ...] = ()
    # The simulator's own identity of an interval whose event does not carry its id (the
    # calculator without ids): for the simulated account's record, never published.
    interval: int | None = None


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
    interval_floor: int = 0  # a new interval begins after this (the previous one's end)
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
    def cid(self) -> int:
        return ACCOUNTS[self.index % len(ACCOUNTS)]

    @property
    def phone(self) -> str:
        return f"3706{self.index:07d}"


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class TrafficGenerator:
    """What flespi would publish for an account of simulated devices; no I/O."""

    def __init__(
        self,
        devices: int,
        seed: int,
        clock: Callable[[], float] = time.time,
        *,
        backlog: bool = True,
    ) -> None:
        self.backlog = backlog  # publish device-time backlogs (days old, GPS rollover)
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
        return Publication("telemetry", topic, _json(value), True, device.cid, TELEMETRY_EXPIRY)

    @staticmethod
    def _of(
        device: SimulatedDevice, family: str, topic: str, payload: bytes, retain: bool
    ) -> Publication:
        return Publication(family, topic, payload, retain, device.cid)

    # -- payloads --------------------------------------------------------------------------------

    def _object(self, device: SimulatedDevice) -> dict[str, Any]:
        return {
            "id": device.id,
            "name": device.name,
            "cid": device.cid,
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
        yield from self._devices_snapshot()
        for n, cid in enumerate(ACCOUNTS):
            counter = Publication(
                "object_property",
                "flespi/state/platform/customer/counters/devices",
                _json(sum(1 for d in self.devices if d.cid == cid) + n),
                True,
                cid,
            )
            yield counter

    def _devices_snapshot(self) -> Iterator[Publication]:
        for device in self.devices:
            now = self.clock()
            yield self._of(device, "object", self._state(device), _json(self._object(device)), True)
            yield self._of(
                device,
                "object_property",
                self._state(device, "/connected"),
                _json(device.connected),
                True,
            )
            yield self._of(
                device,
                "object_property",
                self._state(device, "/last_active"),
                _json(int(now)),
                True,
            )
            for param, value in self._telemetry_snapshot(device, now).items():
                yield self._telemetry(device, param, value)
            yield self._setting(device)
            yield self._of(
                device,
                "setting",
                self._state(device, "/settings/sms_notifications"),
                _json({"enabled": False}),
                True,
            )
            yield self._of(
                device,
                "plugin_config",
                f"flespi/state/gw/plugins/{PLUGIN_ID}/devices/{device.id}",
                _json(self._plugin_config(device)),
                True,
            )
            yield from self._calculator_state(device, synced=True)
            yield self._connection(device)

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
            yield from self._interval(device, deleting=False)
        elif kind == "interval_deleted":
            yield from self._interval(device, deleting=True)
        elif kind == "sms":
            yield self._sms(device)
        elif kind == "setting":
            device.report_interval = self.rng.choice((10, 30, 60, 120))
            yield self._setting(device)
            topic = self._state(device, "/settings/report_interval/interval")
            yield self._of(device, "setting", topic, _json(device.report_interval), True)
        elif kind == "plugin_config":
            config = self._plugin_config(device) | {"enabled": self.rng.random() < 0.8}
            topic = f"flespi/state/gw/plugins/{PLUGIN_ID}/devices/{device.id}"
            yield self._of(device, "plugin_config", topic, _json(config), True)
        elif kind == "object":
            device.name_kind = self.rng.choice(NAME_KINDS)
            yield self._of(device, "object", self._state(device), _json(self._object(device)), True)
            name_topic = self._state(device, "/name")
            yield self._of(device, "object_property", name_topic, _json(device.name), True)
        elif kind == "deletion":
            param = self.rng.choice(DELETABLE_PARAMS)
            topic = self._state(device, f"/telemetry/{param}")
            yield self._of(device, "deletion", topic, b"", True)
        elif kind == "backlog":
            if self.backlog:
                yield from self._backlog(device)
        elif kind == "calculator":
            yield from self._calculator_state(device, synced=self.rng.random() < 0.9)
        elif kind == "connection":
            yield self._connection(device)
        elif kind == "log":
            yield self._log(device)
        elif kind == "container":
            yield from self._container(device)
        elif kind == "removal":
            yield from self._removal(device)
        elif kind == "stray":
            yield self._stray_channel_message(device)
        else:
            raise ValueError(f"unknown simulated event {kind!r}")

    def _setting(self, device: SimulatedDevice) -> Publication:
        return self._of(
            device,
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
        yield self._of(device, "device_message", device_topic, payload, False)
        yield self._of(device, "channel_message", channel_topic, payload, False)

    def _property(self, device: SimulatedDevice) -> Iterator[Publication]:
        if self.rng.random() < 0.2:
            device.connected = not device.connected
            yield self._of(
                device,
                "object_property",
                self._state(device, "/connected"),
                _json(device.connected),
                True,
            )
        yield self._of(
            device,
            "object_property",
            self._state(device, "/last_active"),
            _json(int(self.clock())),
            True,
        )

    def _interval(self, device: SimulatedDevice, *, deleting: bool) -> Iterator[Publication]:
        """An interval event, and the calculator's activation event when it opens or closes."""
        publication = self._interval_event(device, deleting=deleting)
        yield publication
        event = publication.topic.rsplit("/", 1)[1]
        if event in ("created", "deleted"):
            activation = "activated" if event == "created" else "deactivated"
            topic = publication.topic.rsplit("/", 1)[0] + "/" + activation
            payload = publication.payload if event == "created" else _json({})
            yield self._of(device, "calculator_device", topic, payload, False)

    def _interval_event(self, device: SimulatedDevice, *, deleting: bool) -> Publication:
        """created opens an interval, updated extends its end, deleted drops it.

        Odd devices: CALC_ID, every event with the interval's ``id`` and the same ``begin``.
        Even devices: SPAN_CALC_ID, no ``id``; a device's intervals never overlap; an update
        may move ``begin`` back (a recalculation taking in an earlier message), and a deletion
        carries the whole interval, only its ``end`` or only its ``begin`` (UNCONFIRMED shape:
        both readings)."""
        rng = self.rng
        now = self.clock()
        spans = device.index % 2 == 0
        interval = device.interval
        roll = rng.random()
        if deleting and interval is not None:
            event = "deleted"
            device.interval = None
        elif interval is None or roll < 0.25:
            event = "created"
            if interval is not None:
                device.interval_floor = interval.end
            begin = max(int(now) - rng.randint(60, 600), device.interval_floor + 1)
            interval = OpenInterval(
                self.next_interval_id,
                begin,
                max(int(now), begin),
                rng.uniform(0.5, 5.0),
                rng.randint(20, 90),
            )
            self.next_interval_id += 1
            device.interval = interval
        elif roll < 0.93:
            # Now and then by the legacy name flespi's UI still handles: the same update.
            event = "finished" if roll >= 0.9 else "updated"
            interval.end = max(int(now), interval.end + 1)
            interval.mileage += rng.uniform(0.1, 3.0)
            interval.max_speed = max(interval.max_speed, rng.randint(20, 120))
            if spans and roll < 0.6:
                interval.begin = max(interval.begin - rng.randint(1, 30), device.interval_floor + 1)
        else:
            event = "deleted"
            device.interval = None
        if event == "deleted":
            device.interval_floor = interval.end  # flespi's intervals of a device never overlap
        payload: dict[str, Any] = {
            "id": interval.id,
            "begin": interval.begin,
            "end": interval.end,
            "duration": interval.end - interval.begin,
            "timestamp": round(now, 6),
            "mileage": round(interval.mileage, 1),
            "max_speed": interval.max_speed,
        }
        calc = CALC_ID
        if spans:
            calc = SPAN_CALC_ID
            del payload["id"]
            if event == "deleted":
                fields = rng.choice((("begin", "end"), ("end",), ("begin",)))
                payload = {k: payload[k] for k in (*fields, "timestamp")}
        topic = f"flespi/interval/gw/calcs/{calc}/devices/{device.id}/{event}"
        publication = self._of(device, "interval", topic, _json(payload), False)
        return dataclasses.replace(publication, interval=interval.id) if spans else publication

    def _sms(self, device: SimulatedDevice) -> Publication:
        payload = {
            "timestamp": round(self.clock(), 6),
            "text": self.rng.choice(SMS_TEXTS),
            "phone": f"+{device.phone}",
        }
        topic = f"flespi/message/gw/modems/{MODEM_ID}/{device.phone}"
        return self._of(device, "modem_message", topic, _json(payload), False)

    # -- the shapes real accounts add (issue 8) -----------------------------------------------

    def _device_message(self, device: SimulatedDevice, device_time: float) -> dict[str, Any]:
        position = self._position(device)
        return {
            "ident": device.ident,
            "timestamp": round(device_time, 6),
            "server.timestamp": round(self.clock(), 6),
            "channel.id": CHANNEL_ID,
            "device.id": device.id,
            "device.name": device.name,
            "peer": f"10.20.{device.index // 250 % 250}.{device.index % 250}:5000",
            "position.latitude": position["latitude"],
            "position.longitude": position["longitude"],
            "position.valid": False,
        }

    def _backlog(self, device: SimulatedDevice) -> Iterator[Publication]:
        """A black box replaying days-old records out of order, one with its GPS week rolled
        over to 1999, one on the older topic that carries the device name."""
        now = self.clock()
        times = [now - self.rng.uniform(1, 5) * 86_400 for _ in range(3)]
        times.append(times[0] - GPS_ROLLOVER_SHIFT)
        self.rng.shuffle(times)
        for i, device_time in enumerate(times):
            topic = f"flespi/message/gw/devices/{device.id}"
            if i == 0:
                topic += f"/{device.name}"
            payload = _json(self._device_message(device, device_time))
            yield self._of(device, "device_message", topic, payload, False)

    def _calculator_state(self, device: SimulatedDevice, *, synced: bool) -> Iterator[Publication]:
        base = f"flespi/state/gw/calcs/{CALC_ID}/devices/{device.id}"
        now = int(self.clock())
        last = {"id": self.next_interval_id, "begin": now - 600, "end": now - 60,
                "duration": 540, "timestamp": now - 60}  # fmt: skip
        active = None
        if device.interval is not None:
            active = {"id": device.interval.id, "begin": device.interval.begin}
        for field, value in (("last", last), ("active", active), ("synced", synced)):
            topic = f"{base}/{field}"
            publication = self._of(device, "calculator_device", topic, _json(value), True)
            if field == "last":  # flespi's KB: whether the last interval is still open
                flag = "true" if active is not None else "false"
                publication = dataclasses.replace(publication, properties=(("active", flag),))
            yield publication

    def _connection(self, device: SimulatedDevice) -> Publication:
        conn = 7_000_000 + device.index * 10 + self.rng.randrange(3)
        payload = {"id": conn, "channel_id": CHANNEL_ID, "established": int(self.clock()),
                   "ident": device.ident, "source": f"10.20.0.{device.index % 250}:5000",
                   "transport": "tcp"}  # fmt: skip
        topic = self._state(device, f"/connections/{conn}")
        return self._of(device, "object_property", topic, _json(payload), True)

    def _log(self, device: SimulatedDevice) -> Publication:
        now = round(self.clock(), 6)
        if self.rng.random() < 0.5:
            queue = self.rng.randrange(1, 4)
            topic = f"flespi/log/gw/devices/{device.id}/commands-queue/{queue}/executed"
            record = {"timestamp": now, "event_code": 306, "origin_type": 11,
                      "command": "setdigout", "result": "OK"}  # fmt: skip
        else:
            event = "connected" if device.connected else "disconnected"
            topic = f"flespi/log/gw/channels/{CHANNEL_ID}/{event}"
            record = {"timestamp": now, "event_code": 101 if device.connected else 102,
                      "origin_type": 10, "ident": device.ident}  # fmt: skip
        return self._of(device, "platform_log", topic, _json(record), False)

    def _container(self, device: SimulatedDevice) -> Iterator[Publication]:
        now = round(self.clock(), 6)
        record = {"timestamp": now, "device.id": device.id, "trip": self.rng.randrange(1000)}
        topic = f"flespi/message/storage/containers/{CONTAINER_ID}"
        yield self._of(device, "other_message", topic, _json(record), False)
        topic = f"flespi/message/storage/abques/{ABQUE_ID}/alarms"
        alarm = _json({"timestamp": now, "text": "SOS"})
        yield self._of(device, "other_message", topic, alarm, False)

    def _removal(self, device: SimulatedDevice) -> Iterator[Publication]:
        """Settings and plugin configurations cleared, and a device created then deleted (by
        an empty payload or by ``deleted``), as a user removing things in flespi's UI."""
        setting = self._state(device, "/settings/sms_notifications")
        yield self._of(device, "deletion", setting, b"", True)
        topic = f"flespi/state/gw/plugins/{PLUGIN_ID}/devices/{device.id}"
        yield self._of(device, "deletion", topic, b"", True)
        ghost = f"flespi/state/gw/devices/{GHOST_DEVICE_ID + device.index}"
        body = {"id": GHOST_DEVICE_ID + device.index, "name": "temporary", "cid": device.cid}
        yield self._of(device, "object", ghost, _json(body), True)
        if self.rng.random() < 0.5:  # flespi marks the item deleted, and/or clears its topic
            yield self._of(device, "deletion", f"{ghost}/deleted", _json(True), True)
        yield self._of(device, "deletion", ghost, b"", True)

    def _stray_channel_message(self, device: SimulatedDevice) -> Publication:
        """A channel also sees devices not registered in flespi: no device.id, another ident."""
        message = self._device_message(device, self.clock() - 1)
        for key in ("device.id", "device.name"):
            del message[key]
        message["ident"] = f"99{device.index:012d}"
        topic = f"flespi/message/gw/channels/{CHANNEL_ID}/{message['ident']}"
        return self._of(device, "channel_message", topic, _json(message), False)


def _cos_deg(degrees: float) -> float:
    return math.cos(math.radians(degrees))


def _sin_deg(degrees: float) -> float:
    return math.sin(math.radians(degrees))
