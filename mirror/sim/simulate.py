"""Publish realistic flespi traffic to any MQTT broker, for demos, tests and load.

A real flespi account cannot be written to (the broker discards client publishes to `flespi/...`),
so the mirror is demonstrated, tested and benchmarked against a broker of our own fed by this
module: QoS 1, MQTT 5 user properties ``timestamp`` and ``cid``, paced to a rate, every publish
acknowledged before it counts. What is published comes from ``traffic.py``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mirror.sim.traffic import FAMILIES, Publication, TrafficGenerator

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 1000  # publishes sent but not yet acknowledged (PUBACK)
CONNECT_TIMEOUT = 10.0  # seconds to wait for the CONNACK
DRAIN_TIMEOUT = 30.0  # seconds to wait for the last PUBACKs
BURST_SECONDS = 1.0  # how much lost time the pacing may catch up on in a burst


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
    answer_rest: bool = False  # cli: also answer REST over MQTT from the record (rest_responder)
    backlog: bool = True  # device messages with days-old device time (black box, GPS rollover)
    # After the traffic, take over this client id's session and leave it (drop_session below)
    drop_session: str | None = None


@dataclass
class SimulationReport:
    published: int  # publishes acknowledged by the broker (PUBACK), snapshot included
    by_family: dict[str, int]  # acknowledged publishes per family (every family, zeros included)
    elapsed: float  # seconds, connect to last PUBACK


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
        # Called with each publication and its 'timestamp' once sent (the REST responder's record).
        self.observers: list[Callable[[Publication, float], None]] = []

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
        stamp = time.time()
        properties.UserProperty = [
            ("timestamp", f"{stamp:.6f}"), ("cid", str(publication.cid)), *publication.properties
        ]
        if publication.expiry is not None:
            properties.MessageExpiryInterval = publication.expiry
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
        for observe in self.observers:
            observe(publication, stamp)

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


def drop_session(options: SimulationOptions, client_id: str, linger: float = 0.5) -> None:
    """Do to a client what flespi does to a session past its limit of unacknowledged messages:
    disconnect it while its session stays. We connect with its client id (the broker hands the
    session over to us and disconnects it: DISCONNECT 0x8E), acknowledge nothing it delivers
    to us, and leave with a normal DISCONNECT, so the session and its unacknowledged messages
    wait for the client's return. The messages flespi deletes are those over its limit: on
    Mosquitto, set ``max_queued_messages`` (or ``max_queued_bytes``) to drop them alike."""
    host, port, tls = _broker_address(options.mqtt_url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )
    if options.username is not None or options.password is not None:
        client.username_pw_set(options.username or "", options.password)
    if tls:
        client.tls_set()
    connected = threading.Event()
    client.on_connect = lambda *_args: connected.set()
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 86_400  # the session must outlive our visit
    client.connect(host, port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError(f"broker {host}:{port} did not accept the session takeover")
        time.sleep(linger)
    finally:
        client.disconnect()
        client.loop_stop()
    log.info("took over and left the session of %s (as flespi drops a session)", client_id)


def run_simulation(
    options: SimulationOptions,
    *,
    stop: threading.Event | None = None,
    observer: Callable[[Publication, float], None] | None = None,
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
    traffic = TrafficGenerator(options.devices, options.seed, backlog=options.backlog)
    publisher = AcknowledgedPublisher(options)
    if observer is not None:
        publisher.observers.append(observer)
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
    if options.drop_session:
        drop_session(options, options.drop_session)
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
