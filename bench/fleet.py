"""A fleet's device messages as flespi stores them, for the ``history`` scenario.

What makes the figures honest is what makes the data real, so the generator follows what
trackers send (flespi's message fields, kb/messages-basic-information-units; parameter names
from its Teltonika protocol page) rather than random noise:

- 40 parameters a message, about 900 bytes of JSON: ``ident``, ``timestamp`` (device time,
  whole seconds: a tracker's clock), ``server.timestamp`` (0.3-2.5 s later, microseconds),
  channel, device and protocol ids, ``peer`` (its port changes when the device reconnects),
  position (latitude, longitude, altitude, direction, speed, satellites, hdop, valid), power,
  GSM, inputs, ``vehicle.mileage`` and CAN values, accelerations, a record sequence number.
- Each device alternates trips (20-150 minutes, ignition on, speed a random walk to 120 km/h,
  heading drifting) and stops (30-400 minutes, ignition off, position, speed and engine values
  still); so about a third of the day is driving, as for a delivery or service fleet.
- Sensors move as sensors do: voltages in 10 mV steps, temperatures by degrees, the signal
  level now and then; the mileage and the sequence number only grow.

Deterministic for a seed; the JSON text is built from a template (several times faster than
``json.dumps`` of a dict, which matters at 100M messages).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

FIRST_DEVICE_ID = 5_000_000
CHANNEL_ID = 1211
ACCOUNT = 7


@dataclass
class _Device:
    index: int
    latitude: float
    longitude: float
    heading: float
    mileage: float
    fuel: float
    port: int
    cell: int
    signal: int
    altitude: float
    speed: float = 0.0
    ignition: bool = False
    left: int = 0  # minutes until the trip or stop ends
    external: float = 12.6
    temperature: int = 20
    seq: int = 0


@dataclass(frozen=True)
class FleetMessage:
    device_id: int
    ts: float
    server_ts: float
    ident: str
    payload: str
    digest: bytes
    latitude: float
    longitude: float
    speed: float


_TEMPLATE = (
    '{{"ident":"{ident}","timestamp":{ts},"server.timestamp":{sts},"channel.id":{channel},'
    '"device.id":{device_id},"device.name":"truck-{index}","device.type.id":12,'
    '"protocol.id":16,"peer":"10.20.{net}.{host}:{port}","position.latitude":{lat},'
    '"position.longitude":{lon},"position.altitude":{alt},"position.direction":{dir},'
    '"position.speed":{speed},"position.satellites":{sats},"position.hdop":{hdop},'
    '"position.valid":true,"battery.voltage":{bv},"battery.level":100,'
    '"external.powersource.voltage":{ext},"engine.ignition.status":{ign},'
    '"movement.status":{moving},"gsm.signal.level":{signal},"gsm.operator.code":"24602",'
    '"gsm.cellid":{cell},"gsm.lac":101,"gnss.state.enum":{gnss},"din":{din},"dout":0,'
    '"vehicle.mileage":{mileage},"can.fuel.level":{fuel},"can.engine.rpm":{rpm},'
    '"can.vehicle.speed":{speed},"can.engine.temperature":{temp},"sleep.mode.enum":{sleep},'
    '"event.enum":0,"event.priority.enum":0,"x.acceleration":{ax},"y.acceleration":{ay},"record.seqnum":{seq}}}'
)


def _flag(value: bool) -> str:
    return "true" if value else "false"


class Fleet:
    """``devices`` trackers reporting every ``step`` seconds."""

    def __init__(self, devices: int, seed: int = 1, step: float = 60.0) -> None:
        self.rng = random.Random(seed)
        self.step = step
        rng = self.rng
        self.devices = [
            _Device(
                index=n,
                latitude=54.6 + rng.uniform(-0.5, 0.5),
                longitude=25.2 + rng.uniform(-0.5, 0.5),
                heading=rng.uniform(0, 360),
                mileage=rng.uniform(1e4, 3e5),
                fuel=rng.uniform(20, 90),
                port=rng.randrange(40000, 60000),
                cell=20000 + rng.randrange(500),
                signal=rng.randrange(50, 90),
                altitude=110 + rng.uniform(-20, 20),
                left=rng.randrange(0, 400),
            )
            for n in range(1, devices + 1)
        ]

    def messages(self, start: float, reports: int) -> Iterator[FleetMessage]:
        """``reports`` rounds from ``start``: every device once per round, in device order."""
        for r in range(reports):
            t0 = start + r * self.step
            for device in self.devices:
                yield self._report(device, t0)

    def _move(self, d: _Device) -> None:
        rng = self.rng
        minutes = self.step / 60.0
        d.left -= 1
        if d.left <= 0:
            d.ignition = not d.ignition
            trip = (20, 150) if d.ignition else (30, 400)
            d.left = max(1, int(rng.randrange(*trip) / minutes))
            if rng.random() < 0.5:
                d.port = rng.randrange(40000, 60000)  # the tracker reconnected
        if d.ignition:
            d.heading = (d.heading + rng.uniform(-20, 20)) % 360
            d.speed = min(120.0, max(0.0, d.speed + rng.uniform(-15, 15)))
            km = d.speed * self.step / 3600
            d.latitude += km / 111.2 * math.cos(math.radians(d.heading))
            d.longitude += km / 111.2 / 0.58 * math.sin(math.radians(d.heading))
            d.mileage += km
            d.fuel = max(5.0, d.fuel - km * 0.08)
            d.external = min(14.4, max(13.6, d.external + rng.choice((-0.01, 0, 0.01))))
            if d.external < 13:
                d.external = 13.9
            d.temperature = min(92, d.temperature + rng.choice((0, 1, 1, 2)))
            d.altitude += rng.uniform(-2, 2)
            if rng.random() < 0.1:
                d.cell = 20000 + rng.randrange(500)
        else:
            d.speed = 0.0
            d.external = min(12.7, max(12.2, d.external + rng.choice((-0.01, 0, 0, 0.01))))
            if d.external > 13:
                d.external = 12.6
            d.temperature = max(10, d.temperature - rng.choice((0, 1)))
        if rng.random() < 0.2:
            d.signal = min(100, max(20, d.signal + rng.randrange(-5, 6)))
        d.seq += 1

    def _report(self, d: _Device, t0: float) -> FleetMessage:
        rng = self.rng
        self._move(d)
        ts = float(int(t0) + rng.randrange(0, 3))
        sts = round(ts + rng.uniform(0.3, 2.5), 6)
        moving = d.speed > 3
        speed = round(d.speed)
        lat, lon = round(d.latitude, 6), round(d.longitude, 6)
        ident = f"35{d.index:013d}"
        payload = _TEMPLATE.format(
            ident=ident,
            ts=int(ts),
            sts=sts,
            channel=CHANNEL_ID,
            device_id=FIRST_DEVICE_ID + d.index,
            index=d.index,
            net=d.index // 250 % 250,
            host=d.index % 250,
            port=d.port,
            lat=lat,
            lon=lon,
            alt=round(d.altitude),
            dir=round(d.heading),
            speed=speed,
            sats=rng.randrange(9, 13) if moving else 11,
            hdop=rng.choice((0.7, 0.8, 0.9)) if moving else 0.8,
            bv=4.05 if d.ignition else 3.98,
            ext=round(d.external, 2),
            ign=_flag(d.ignition),
            moving=_flag(moving),
            signal=d.signal,
            cell=d.cell,
            gnss=1 if d.ignition else 3,
            din=1 if d.ignition else 0,
            mileage=round(d.mileage, 1),
            fuel=round(d.fuel),
            rpm=700 + speed * 20 if d.ignition else 0,
            temp=d.temperature,
            sleep=0 if d.ignition else 1,
            ax=round(rng.uniform(-0.05, 0.05), 2) if moving else 0,
            ay=round(rng.uniform(-0.05, 0.05), 2) if moving else 0,
            seq=d.seq,
        )
        return FleetMessage(
            FIRST_DEVICE_ID + d.index,
            ts,
            sts,
            ident,
            payload,
            hashlib.md5(payload.encode()).digest(),
            lat,
            lon,
            float(speed),
        )
