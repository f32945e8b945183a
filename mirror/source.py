"""The MQTT 5 session: connect, subscribe, hand out messages in batches, ack when told.

Built on aiomqtt for the connection life cycle (TLS, CONNECT/CONNACK, SUBSCRIBE, DISCONNECT).
Three things aiomqtt 2.5 has no public API for are done on the paho client underneath, each
kept to one small place here and covered by the end-to-end tests:

* **Acknowledge after commit.** ``manual_ack_set(True)``; PUBACKs are queued on paho's output
  only once the transaction holding the messages has committed. A message id is only valid on
  the connection it came in on, so every message carries its connection's *epoch*; an ack for an
  older epoch is dropped (the broker redelivers that message, and the store is idempotent).
  Batches are acknowledged in arrival order, as MQTT 5 expects.
* **Fast intake.** PUBLISH packets are read by ``wire.parse_publish`` (topic, packet id, user
  properties, payload) instead of paho's generic decoder, and appended to our own deque,
  skipping aiomqtt's queue, which drops messages when full. paho's own handler (and its
  ``on_message``) still takes QoS 2, topic aliases and anything unusual. PUBACKs of a batch go
  out as one write.
* **Backpressure.** At ``max_unacked`` messages held in memory we stop reading the socket
  (remove its reader from the event loop) and resume at half that. ReceiveMaximum in CONNECT
  asks the broker for the same bound; brokers that ignore it (Mosquitto 2.0.11) are held off by
  TCP flow control instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mirror.config import Settings
from mirror.records import (
    Inbound,
)
from mirror.wire import PUBACK, parse_publish, pubacks

log = logging.getLogger(__name__)

MQTT_ERR_SUCCESS = MQTTErrorCode.MQTT_ERR_SUCCESS
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0


@dataclass(slots=True)
class Received:
    inbound: Inbound
    mid: int
    qos: int
    epoch: int


def _user_properties(properties: Any) -> dict[str, str]:
    pairs = getattr(properties, "UserProperty", None) if properties is not None else None
    if not pairs:
        return {}
    return {str(k): str(v) for k, v in pairs}


class MqttSource:
    """One persistent MQTT 5 session, reconnecting with backoff until closed."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_connection_change: Callable[[bool], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        resync: bool = False,
        snapshot: bool = False,
    ) -> None:
        self.settings = settings
        # A snapshot session is throwaway: clean start, no expiry, QoS 0, every retained message
        # on subscribe, and only retained messages kept (live ones arrive on the main session).
        self.snapshot = snapshot
        self.subscribed_at: float | None = None
        self.last_retained_at: float | None = None
        self.retained_received = 0
        self.epoch = 0
        self.connected = False
        self.subscribed = False
        self.session_present: bool | None = None
        self.account_id: int | None = None
        self._buffer: deque[Received] = deque()
        self._available = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._closing = asyncio.Event()
        self._draining = False
        self._unacked = 0
        self._paused = False
        self._client: aiomqtt.Client | None = None
        self._paho: Any = None  # the paho client of the current connection, from its CONNACK
        self._sock_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_connection_change = on_connection_change or (lambda _up: None)
        self._on_reconnect = on_reconnect or (lambda: None)
        self._resync = resync
        self._max_qos = 1  # from the CONNACK; flespi's is 1
        self.intake_errors = 0

    # -- what the pipeline uses ---------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """Messages received and not yet acknowledged (buffered or in a batch being written)."""
        return self._unacked

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def oldest_buffered_at(self) -> float | None:
        """Receive time of the oldest message still waiting to be taken, if any."""
        return self._buffer[0].inbound.received_at if self._buffer else None

    async def take(self, max_messages: int, max_wait: float) -> list[Received]:
        """Wait for the first message, then up to ``max_wait`` for a full batch."""
        while not self._buffer:
            self._available.clear()
            if self._closing.is_set() or self._draining:
                return []
            await self._available.wait()
        if len(self._buffer) < max_messages and max_wait > 0:
            deadline = time.monotonic() + max_wait
            while len(self._buffer) < max_messages and not (
                self._closing.is_set() or self._draining
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._available.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._available.wait(), remaining)
        count = min(max_messages, len(self._buffer))
        return [self._buffer.popleft() for _ in range(count)]

    def ack(self, batch: list[Received]) -> int:
        """PUBACK every message of a committed batch, in arrival order, in one write.

        Only messages of the current connection are acked: a message id means nothing on
        another connection, and the broker redelivers what an old connection left unacked.
        """
        paho = self._paho
        mids = []
        if paho is not None:
            epoch = self.epoch
            mids = [m.mid for m in batch if m.qos > 0 and m.epoch == epoch]
            if mids:
                paho._packet_queue(PUBACK, pubacks(mids), 0, 1)
        self.release(len(batch))
        return len(mids)

    def release(self, count: int) -> None:
        """Forget ``count`` messages held in memory (acknowledged, or dropped for redelivery)."""
        self._unacked = max(0, self._unacked - count)
        low_water = self.settings.max_unacked // 2
        if self._unacked <= low_water:
            self._room.set()
            if self._paused and not self._draining:
                self._resume_reading()

    def stop_reading(self) -> None:
        """Shutdown, first step: take nothing more from the broker; :meth:`take` returns what
        is buffered and then an empty batch. The connection stays up for the last acks."""
        self._draining = True
        self._pause_reading()
        self._available.set()

    def close(self) -> None:
        """Ask the session loop to disconnect (keeping the persistent session) and stop."""
        self._closing.set()
        self._available.set()

    # -- the session loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the session until :meth:`close`; reconnect with exponential backoff and jitter."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not self._closing.is_set():
            await self._room.wait()  # never reconnect to a flood while memory is full
            if self._closing.is_set():
                break
            started = time.monotonic()
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                log.warning("MQTT session to %s ended: %s", self._where(), exc)
            except OSError as exc:
                log.warning("MQTT connection to %s failed: %s", self._where(), exc)
            except Exception:  # anything else still ends in a reconnect, never a dead session
                log.exception("MQTT session to %s failed unexpectedly", self._where())
            finally:
                if self.connected:
                    self.connected = False
                    self._on_connection_change(False)
                self.subscribed = False
                self._client = None
                self._paho = None
                self._sock_fd = None
                self._paused = False
            if self._closing.is_set():
                break
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            delay = random.uniform(BACKOFF_MIN, min(BACKOFF_MAX, BACKOFF_MIN * 2**failures))
            self._on_reconnect()
            log.info("reconnecting to %s in %.1fs", self._where(), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    @property
    def client_id(self) -> str:
        base = self.settings.effective_client_id()
        return f"{base}-snapshot" if self.snapshot else base

    def _where(self) -> str:
        broker = self.settings.broker
        return f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}"

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        broker = s.broker
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0 if self.snapshot else s.session_expiry
        props.ReceiveMaximum = min(s.max_unacked, 65535)
        token = s.token.reveal() or None
        tls_context = None
        if broker.tls:
            tls_context = ssl.create_default_context(cafile=s.ca_file)
        client = aiomqtt.Client(
            hostname=broker.host,
            port=broker.port,
            username=None if s.token_in_password else token,
            password=token if s.token_in_password else None,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=self.snapshot,
            properties=props,
            keepalive=s.keepalive,
            tls_context=tls_context,
            timeout=30,
        )
        paho = client._client
        paho.manual_ack_set(True)
        paho.on_message = self._on_message
        aiomqtt_on_connect: Any = paho.on_connect
        aiomqtt_on_socket_open: Any = paho.on_socket_open

        def on_connect(
            c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None
        ) -> None:
            # A new epoch before any PUBLISH of this connection is read (they may arrive in the
            # same read as the CONNACK), so every message carries the epoch it can be acked on.
            self.epoch += 1
            self._paho = c
            self.session_present = bool(getattr(flags, "session_present", False))
            self._read_connack(properties)
            aiomqtt_on_connect(c, userdata, flags, reason, properties)

        def on_socket_open(c: Any, userdata: Any, sock: Any) -> None:
            self._sock_fd = sock.fileno()
            aiomqtt_on_socket_open(c, userdata, sock)

        paho.on_connect = on_connect
        paho.on_socket_open = on_socket_open
        paho_handle_publish = paho._handle_publish

        def handle_publish() -> Any:
            """Our PUBLISH reader (wire.py); paho's own for anything unusual."""
            parsed = parse_publish(paho._in_packet["command"], paho._in_packet["packet"])
            if parsed is None:
                return paho_handle_publish()
            self._accept(
                parsed.topic.decode("utf-8", errors="replace"),
                parsed.payload,
                parsed.properties,
                parsed.mid,
                parsed.qos,
                parsed.retain,
            )
            return MQTT_ERR_SUCCESS

        paho._handle_publish = handle_publish  # type: ignore[method-assign]
        return client

    def _read_connack(self, properties: Any) -> None:
        user = _user_properties(properties)
        token_info = user.get("token")
        if token_info:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                cid = json.loads(token_info).get("cid")
                self.account_id = int(cid) if cid is not None else None
        self._max_qos = int(getattr(properties, "MaximumQoS", 1) or 0) if properties else 1

    async def _session(self) -> None:
        client = self._make_client()
        async with client:
            self._client = client
            self._paused = False
            self.connected = True
            if self._draining:
                self._pause_reading()
            self._on_connection_change(True)
            log.info(
                "connected to %s as %s (session present: %s%s)",
                self._where(),
                self.client_id,
                self.session_present,
                f", account {self.account_id}" if self.account_id else "",
            )
            # Subscribe without waiting: with a backlog queued in the session, the broker may
            # send the SUBACK only after the backlog, which we must consume meanwhile.
            subscribing = asyncio.create_task(self._subscribe(client))
            disconnected: asyncio.Future[None] = client._disconnected
            closing = asyncio.create_task(self._closing.wait())
            waiting: set[asyncio.Future[Any]] = {disconnected, closing}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closing.cancel()
                subscribing.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await subscribing
            if disconnected.done():
                exc = disconnected.exception()
                if exc is not None:
                    raise aiomqtt.MqttError(f"connection lost: {exc}")
            # Leaving the context sends DISCONNECT; the session expiry from CONNECT stays, so
            # the broker keeps queueing for us until we return.

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        qos = 0 if self.snapshot else min(1, self._max_qos)
        # retainHandling=1: retained messages only for a subscription the session lacks, so a
        # reconnect to a persistent session does not replay the whole retained state.
        retain_handling = 0 if (self._resync or self.snapshot) else 1
        filters = self.settings.snapshot_topics if self.snapshot else self.settings.subscriptions
        topics = [
            (topic, SubscribeOptions(qos=qos, retainHandling=retain_handling)) for topic in filters
        ]
        codes = await client.subscribe(topics, timeout=None)
        failed = [
            (topic, str(code))
            for (topic, _), code in zip(topics, codes, strict=False)
            if getattr(code, "value", 0) >= 0x80
        ]
        if failed:
            log.error("the broker refused subscriptions: %s", failed)
        else:
            self._resync = False
            self.subscribed = True
            self.subscribed_at = time.monotonic()
            log.info("subscribed to %s", ", ".join(topic for topic, _ in topics))

    # -- intake (runs inside paho's read callback, on the event loop thread) ------------------

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        """paho's callback, for the packets :func:`wire.parse_publish` leaves to paho."""
        try:
            topic = message._topic.decode("utf-8", errors="replace")
            properties = _user_properties(getattr(message, "properties", None))
            payload = bytes(message.payload)
        except Exception:
            self.intake_errors += 1
            log.exception("could not take a message off the wire")
            return
        self._accept(topic, payload, properties, int(message.mid), int(message.qos), message.retain)

    def _accept(
        self,
        topic: str,
        payload: bytes,
        properties: dict[str, str],
        mid: int,
        qos: int,
        retain: bool,
    ) -> None:
        """Buffer one received message; pause reading at the bound. Never raises."""
        if self.snapshot:
            if not retain:
                return  # live traffic: the main session delivers it
            self.last_retained_at = time.monotonic()
            self.retained_received += 1
        inbound = Inbound(topic, payload, properties, time.time(), bool(retain), qos)
        self._buffer.append(Received(inbound, mid, qos, self.epoch))
        self._unacked += 1
        self._available.set()
        if self._unacked >= self.settings.max_unacked:
            self._room.clear()
            self._pause_reading()

    def _pause_reading(self) -> None:
        if self._paused or self._sock_fd is None or self._loop is None:
            return
        self._loop.remove_reader(self._sock_fd)
        self._paused = True
        log.debug("holding %d unacked messages: paused reading from the broker", self._unacked)

    def _resume_reading(self) -> None:
        if not self._paused or self._sock_fd is None or self._loop is None or not self.connected:
            self._paused = False
            return
        self._loop.add_reader(self._sock_fd, self._read_socket)
        self._paused = False
        log.debug("resumed reading from the broker")

    def _read_socket(self) -> None:
        """The socket reader while we own it (after a pause); mirrors aiomqtt's own."""
        client = self._client
        if client is None:
            return
        paho = client._client
        try:
            while True:
                paho.loop_read()
                sock: Any = paho._sock
                if self._paused or not (hasattr(sock, "pending") and sock.pending() > 0):
                    break
        except Exception as exc:
            disconnected = client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)
