"""The MQTT 5 session: connect, subscribe, hand out messages in batches that carry their ack.

Our own small session over the ``mqtt5`` sans-I/O codec (Rust; decoding a flespi PUBLISH costs
about a microsecond) and a byte stream from ``transport.py`` (mqtt://, mqtts://, ws://, wss://).
aiomqtt 3.0.0a1, built on the same codec, was evaluated first and not taken: it pins
``mqtt5~=0.5`` (its import of ``mqtt5.Subscription`` fails on 0.8), has no WebSockets, connects
with a blocking IPv4-only socket, writes and drains one PUBACK at a time, and cannot stop
reading at a memory bound. The shape here follows it (``publish``/``subscribe`` with the
codec's packets, a receive loop, a PINGREQ loop) so that a later swap stays small.

What the session guarantees (each one tested, see ``tests/test_session.py``):

* **Ack after commit, in order, at once.** :meth:`MqttSource.take` returns a :class:`Batch`;
  ``batch.ack()`` queues the PUBACKs of all its QoS 1 messages, in arrival order, as one write.
  A packet id is only valid on the connection it came in on: messages of an older connection are
  not acked (the broker redelivers them; the store is idempotent).
* **Memory bound in messages and bytes.** At ``max_unacked`` messages or ``max_unacked_bytes``
  (wire size) held, the session stops reading the connection (TCP then holds the broker off) and
  resumes at half of both. CONNECT carries ReceiveMaximum (``max_unacked``) and Maximum Packet
  Size (``max_payload_bytes`` + 64 KiB), so no single packet can exceed what we accept.
* **Keepalive.** PINGREQ after ``keepalive`` seconds of silence either way; a connection that
  stays silent for 1.5x ``keepalive`` while we read is declared dead and reconnected.
* **Refusals and faults.** QoS 2 is never PUBACKed (PUBREC 0x83: refused); topic aliases are not
  requested and one that arrives ends the connection (DISCONNECT 0x94); a malformed packet ends
  it with DISCONNECT 0x81; a DISCONNECT 0x8E is logged as another client taking the client id.
  Every one of these ends in a reconnect with backoff, never a crash.
* **Subscribing never times out.** Mosquitto sends the SUBACK after a queued backlog; we wait for
  it as long as the connection lives.

API for other parts of the daemon (e.g. REST over MQTT):

* ``await source.publish(topic, payload, qos=0|1, response_topic=..., correlation_data=...,
  user_properties=[...])``: one attempt on the current connection; QoS 1 waits for the PUBACK.
  Raises :class:`NotConnected` when there is no connection (or it is lost before the PUBACK),
  :class:`PublishRefused` for a PUBACK reason code >= 0x80.
* ``source.route(topic_filter, prefix, queue, qos=0)``: subscribe ``topic_filter`` on every
  (re)connect and put each ``mqtt5.PublishPacket`` whose topic starts with ``prefix`` on
  ``queue`` instead of the mirror pipeline (QoS 1 ones are acked at once; a full queue drops the
  message with a warning); it returns an event set once the broker has granted the
  subscription. ``source.unroute(prefix)`` forgets it.
* ``MqttSource(settings, requester=True)``: a throwaway session beside the daemon's (its own
  client id, clean start) that subscribes to its routes only: the ``backfill`` and ``reconcile``
  commands' REST (``repair/rest_carrier.py``). Its first connection failing ends it at once.
* ``source.account_cid``: the account id from the CONNACK user property ``token`` (flespi).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import mqtt5
from mqtt5 import (
    ConnAckPacket,
    ConnAckReasonCode,
    ConnectPacket,
    DisconnectPacket,
    DisconnectReasonCode,
    PingReqPacket,
    PingRespPacket,
    PubAckPacket,
    PublishPacket,
    PubRecPacket,
    PubRecReasonCode,
    PubRelPacket,
    QoS,
    RetainHandling,
    SubAckPacket,
    SubscribePacket,
    TopicFilter,
)

from mirror.ops.config import Settings
from mirror.ops.failures import BrokerUnreachable
from mirror.session.mqtt import (
    ConnectRefused,
    Inbox,
    Link,
    NotConnected,
    ProtocolViolation,
    PublishRefused,
    SessionEnded,
    account_cid_from,
    reason_text,
)
from mirror.session.transport import Connection, open_connection

__all__ = [
    "Batch",
    "ConnectRefused",
    "MqttSource",
    "NotConnected",
    "PublishRefused",
    "Received",
    "SessionEnded",
]

log = logging.getLogger(__name__)

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
DEAD_AFTER = 1.5  # x keepalive of silence while reading: the connection is presumed dead
RECEIVE_MAXIMUM_LIMIT = 65535

ConnectFn = Callable[[], Awaitable[Connection]]


@dataclass(slots=True)
class Received:
    """One message as the broker delivered it, held until its batch is acknowledged.

    The session hands over bytes, topic and properties; what they mean (the domain's
    ``records.Inbound`` and the record it becomes) is decoding's business, not the session's."""

    topic: str
    payload: bytes
    properties: dict[str, str]  # MQTT 5 user properties
    received_at: float  # Unix time
    retain: bool
    qos: int
    message_expiry: int | None  # the expiry interval left, in seconds (flespi expires telemetry)
    packet_id: int  # 0 for QoS 0: nothing to acknowledge
    size: int  # bytes on the wire, for the memory bound
    epoch: int  # the connection it came in on


@dataclass(eq=False)
class Batch:
    """Messages taken together, and the way to acknowledge them once written."""

    messages: list[Received]
    size: int
    _ack: Callable[[Batch], int] = field(repr=False)
    _done: bool = field(default=False, repr=False)

    def ack(self) -> int:
        """PUBACK every QoS 1 message of the batch (one write, arrival order) and release its
        memory. Call after the messages are safely written; later calls do nothing. Returns the
        number of PUBACKs sent (messages of an older connection get none: redelivered)."""
        if self._done:
            return 0
        self._done = True
        return self._ack(self)

    def take_out(self, messages: Collection[int]) -> Batch:
        """Move the messages given (by ``id``) into a batch of their own, acknowledged on its
        own later (a record set aside: see pipeline.py)."""
        out = [m for m in self.messages if id(m) in messages]
        self.messages = [m for m in self.messages if id(m) not in messages]
        size = sum(m.size for m in out)
        self.size -= size
        return Batch(out, size, self._ack)

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[Received]:
        return iter(self.messages)

    def __bool__(self) -> bool:
        return bool(self.messages)


@dataclass
class _Route:
    topic_filter: str
    prefix: str
    queue: asyncio.Queue[PublishPacket]
    qos: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the broker granted it


class MqttSource:
    """One MQTT 5 session (persistent unless a snapshot or a requester), reconnecting until
    :meth:`close`."""

    def __init__(
        self,
        settings: Settings,
        *,
        connect: ConnectFn | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
        on_reconnect: Callable[[], None] | None = None,
        resync: bool = False,
        snapshot: bool = False,
        requester: bool = False,
    ) -> None:
        self.settings = settings
        # A snapshot session is throwaway: clean start, no expiry, QoS 0, every retained message
        # on subscribe, and only retained messages kept (live ones arrive on the main session).
        self.snapshot = snapshot
        # A requester session (the backfill and reconcile commands) is throwaway too, under a
        # client id of its own beside a running daemon, and subscribes to its routes only.
        self.requester = requester
        self._throwaway = snapshot or requester
        self._requester_id = uuid.uuid4().hex[:8]
        self._connect = connect or self._open
        self._on_connection_change = on_connection_change or (lambda _up: None)
        self._on_reconnect = on_reconnect or (lambda: None)
        self._resync = resync
        self.subscribed_at: float | None = None
        self.last_retained_at: float | None = None
        self.retained_received = 0
        self.epoch = 0
        self.connected = False
        # The reason code of the broker's DISCONNECT that ended the last connection (None: the
        # connection ended without one, or has not ended).
        self.last_disconnect_code: int | None = None
        self.subscribed = False
        self.subscribed_event = asyncio.Event()  # set once a subscription has succeeded
        self.retained_requested = False  # the last subscription asked for every retained message
        self.session_present: bool | None = None
        self.account_cid: int | None = None
        self.keepalive = settings.keepalive
        self.ended_reason: str | None = None  # why the last connection ended
        self._buffer: deque[Received] = deque()
        self._buffered_bytes = 0
        self._unacked = 0
        self._unacked_bytes = 0
        self._available = asyncio.Event()
        self._may_read = asyncio.Event()
        self._may_read.set()
        self._closing = asyncio.Event()
        self._draining = False
        self._link: Link | None = None
        self._last_heard = time.monotonic()
        self._packet_ids = itertools.cycle(range(1, 65536))
        self._pending: dict[int, asyncio.Future[mqtt5.Packet]] = {}
        self._routes: dict[str, _Route] = {}
        self._max_qos = 1
        self._server_max_packet: int | None = None
        self.refused_qos2 = 0

    # -- what the pipeline uses ---------------------------------------------------------------

    @property
    def unacked(self) -> int:
        """Messages received and not yet acknowledged (buffered or in a batch being written)."""
        return self._unacked

    @property
    def unacked_bytes(self) -> int:
        return self._unacked_bytes

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def oldest_buffered_at(self) -> float | None:
        """Receive time of the oldest message still waiting to be taken, if any."""
        return self._buffer[0].received_at if self._buffer else None

    async def take(self, max_messages: int, max_wait: float, max_bytes: int | None = None) -> Batch:
        """Wait for the first message, then up to ``max_wait`` for a full batch (``max_messages``
        or ``max_bytes``, whichever comes first; always at least one message). Empty only once
        stopping and drained."""
        max_bytes = max_bytes or self.settings.max_batch_bytes
        while not self._buffer:
            self._available.clear()
            if self._closing.is_set() or self._draining:
                return self._batch([], 0)
            await self._available.wait()
        if len(self._buffer) < max_messages and self._buffered_bytes < max_bytes and max_wait > 0:
            deadline = time.monotonic() + max_wait
            while (
                len(self._buffer) < max_messages
                and self._buffered_bytes < max_bytes
                and not (self._closing.is_set() or self._draining)
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._available.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._available.wait(), remaining)
        buffer = self._buffer
        taken: list[Received] = [buffer.popleft()]
        size = taken[0].size
        while buffer and len(taken) < max_messages and size + buffer[0].size <= max_bytes:
            message = buffer.popleft()
            taken.append(message)
            size += message.size
        self._buffered_bytes -= size
        return self._batch(taken, size)

    def _batch(self, messages: list[Received], size: int) -> Batch:
        return Batch(messages, size, self._ack)

    def _ack(self, batch: Batch) -> int:
        link = self._link
        count = 0
        if link is not None and not link.closed:
            epoch = link.epoch
            packets = [
                puback(m.packet_id)
                for m in batch.messages
                if m.packet_id and m.epoch == epoch
            ]
            if packets and link.post(b"".join(packets)):
                count = len(packets)
        self._release(len(batch.messages), batch.size)
        return count

    def _release(self, count: int, size: int) -> None:
        self._unacked = max(0, self._unacked - count)
        self._unacked_bytes = max(0, self._unacked_bytes - size)
        if (
            not self._may_read.is_set()
            and not self._draining
            and self._unacked <= self.settings.max_unacked // 2
            and self._unacked_bytes <= self.settings.max_unacked_bytes // 2
        ):
            self._last_heard = time.monotonic()  # the silence while paused was ours
            self._may_read.set()

    def stop_reading(self) -> None:
        """Shutdown, first step: take nothing more from the broker; :meth:`take` returns what
        is buffered and then an empty batch. The connection stays up for the last acks."""
        self._draining = True
        self._may_read.clear()
        self._available.set()

    def close(self) -> None:
        """Ask the session loop to disconnect (keeping the persistent session) and stop."""
        self._closing.set()
        self._available.set()

    def request_retained(self) -> None:
        """Ask for every retained message on the next subscription (a full snapshot)."""
        self._resync = True

    # -- publishing and private subscriptions ---------------------------------------------------

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        user_properties: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Publish once on the current connection; QoS 1 waits for the broker's PUBACK."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1 (flespi does not support QoS 2)")
        link = self._link
        if link is None or link.closed:
            raise NotConnected("not connected to the broker")
        packet_id = self._next_packet_id() if qos else None
        data = PublishPacket(
            topic,
            payload,
            qos=QoS(qos),
            retain=retain,
            packet_id=packet_id,
            response_topic=response_topic,
            correlation_data=correlation_data,
            user_properties=list(user_properties),
        ).write()
        if self._server_max_packet is not None and len(data) > self._server_max_packet:
            raise ValueError(
                f"a {len(data)}-byte PUBLISH exceeds the broker's maximum packet size "
                f"({self._server_max_packet})"
            )
        if packet_id is None:
            link.post(data)
            return
        reply = await self._request(link, packet_id, data)
        assert isinstance(reply, PubAckPacket)
        if int(reply.reason_code) >= 0x80:
            raise PublishRefused(f"PUBLISH to {topic} refused: {reply.reason_code.name}")

    def route(
        self,
        topic_filter: str,
        prefix: str,
        queue: asyncio.Queue[PublishPacket],
        *,
        qos: int = 0,
    ) -> asyncio.Event:
        """Deliver messages whose topic starts with ``prefix`` to ``queue``, not the pipeline;
        ``topic_filter`` is subscribed on every (re)connect, and now if connected. The event
        returned is set once the broker has granted the subscription."""
        route = _Route(topic_filter, prefix, queue, qos)
        self._routes[prefix] = route
        link = self._link
        if link is not None and not link.closed:
            task = asyncio.get_running_loop().create_task(self._subscribe_routes(link, [route]))
            task.add_done_callback(_log_failure)
        return route.ready

    def unroute(self, prefix: str) -> None:
        self._routes.pop(prefix, None)

    # -- the session loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Hold the session until :meth:`close`; reconnect with exponential backoff and jitter."""
        failures = 0
        while not self._closing.is_set():
            await self._wait_or_closing(self._room())  # never reconnect into a flood
            if self._closing.is_set():
                break
            started = time.monotonic()
            try:
                await self._session()
            except BrokerUnreachable as exc:
                self.ended_reason = str(exc)
                log.warning("%s", exc)
            except ConnectRefused as exc:
                self.ended_reason = str(exc)
                log.error("the broker at %s refused the connection: %s", self._where(), exc)
            except (SessionEnded, OSError, TimeoutError) as exc:
                self.ended_reason = str(exc) or type(exc).__name__
                log.warning("MQTT session to %s ended: %s", self._where(), self.ended_reason)
            except Exception as exc:  # anything else still ends in a reconnect, never a crash
                self.ended_reason = repr(exc)
                log.exception("MQTT session to %s failed unexpectedly", self._where())
            finally:
                self._disconnected()
            if self._closing.is_set():
                break
            if self.requester and self.session_present is None:
                break  # a command's first connection failed: it says so now (rest_carrier.py)
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            delay = random.uniform(BACKOFF_MIN, min(BACKOFF_MAX, BACKOFF_MIN * 2**failures))
            self._on_reconnect()
            log.info("reconnecting to %s in %.1fs", self._where(), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    async def _room(self) -> None:
        while (
            self._unacked >= self.settings.max_unacked
            or self._unacked_bytes >= self.settings.max_unacked_bytes
        ):
            self._may_read.clear()
            await self._may_read.wait()

    async def _wait_or_closing(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, closing):
                t.cancel()

    @property
    def client_id(self) -> str:
        base = self.settings.effective_client_id()
        if self.requester:
            return f"{base}-rest-{self._requester_id}"
        return f"{base}-snapshot" if self.snapshot else base

    def _where(self) -> str:
        return str(self.settings.broker)

    async def _open(self) -> Connection:
        s = self.settings
        return await open_connection(
            s.broker, ca_file=s.ca_file, max_message_bytes=s.max_packet_bytes + 65536
        )

    def _connect_packet(self) -> bytes:
        s = self.settings
        token = s.token.reveal() or None
        return ConnectPacket(
            self.client_id,
            username=None if s.token_in_password else token,
            password=token.encode() if (token and s.token_in_password) else None,
            clean_start=self._throwaway,
            keep_alive=s.keepalive,
            session_expiry_interval=0 if self._throwaway else s.session_expiry,
            receive_max=min(s.max_unacked, RECEIVE_MAXIMUM_LIMIT),
            max_packet_size=s.max_packet_bytes,
            topic_alias_max=0,  # never: aliases would tie messages to connection state
        ).write()

    async def _session(self) -> None:
        try:
            conn = await self._connect()
        except (OSError, TimeoutError) as exc:
            raise BrokerUnreachable.opening(self._where(), exc) from exc
        inbox = Inbox(self.settings.max_packet_bytes)
        link: Link | None = None
        try:
            link = await self._handshake(conn, inbox)
            await self._serve(link, inbox)
        except ProtocolViolation as exc:
            if link is not None:
                await link.finish(DisconnectPacket(reason_code=exc.code).write())
                link = None
            raise
        finally:
            if link is not None:
                normal = self._closing.is_set()
                last = DisconnectPacket().write() if normal else b""
                await link.finish(last)
            else:
                await conn.close()

    async def _handshake(self, conn: Connection, inbox: Inbox) -> Link:
        await conn.send(self._connect_packet())
        packets: list[tuple[mqtt5.Packet, int]] = []
        async with asyncio.timeout(max(10.0, float(self.settings.keepalive))):
            while not packets:
                data = await conn.read()
                if not data:
                    raise SessionEnded("the broker closed the connection before CONNACK")
                packets = inbox.feed(data)
        connack = packets[0][0]
        if not isinstance(connack, ConnAckPacket):
            raise ProtocolViolation(
                DisconnectReasonCode.PROTOCOL_ERROR,
                f"expected CONNACK, got {type(connack).__name__}",
            )
        if connack.reason_code != ConnAckReasonCode.SUCCESS:
            raise ConnectRefused(reason_text(connack.reason_code, connack.reason_str))
        self.epoch += 1
        self.last_disconnect_code = None
        link = Link(conn, self.epoch)
        self._link = link
        self.session_present = connack.session_present
        self.account_cid = account_cid_from(connack)
        self.keepalive = (
            connack.server_keep_alive
            if connack.server_keep_alive is not None
            else self.settings.keepalive
        )
        self._max_qos = int(connack.max_qos)
        self._server_max_packet = connack.max_packet_size
        self._last_heard = time.monotonic()
        self.connected = True
        self._on_connection_change(True)
        log.info(
            "connected to %s as %s (session present: %s%s)",
            self._where(),
            self.client_id,
            self.session_present,
            f", account {self.account_cid}" if self.account_cid else "",
        )
        # PUBLISHes may come in the same read as the CONNACK
        link.undispatched = self._dispatch(link, packets[1:])
        return link

    async def _serve(self, link: Link, inbox: Inbox) -> None:
        tasks = [
            asyncio.create_task(self._receive(link, inbox), name="mqtt-receive"),
            asyncio.create_task(link.writer(), name="mqtt-send"),
            asyncio.create_task(self._keepalive(link), name="mqtt-keepalive"),
            asyncio.create_task(self._closing.wait(), name="mqtt-closing"),
        ]
        subscribing = asyncio.create_task(self._subscribe(link), name="mqtt-subscribe")
        subscribing.add_done_callback(_log_failure)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in [*tasks, subscribing]:
                task.cancel()
            await asyncio.gather(*tasks, subscribing, return_exceptions=True)

    def _disconnected(self) -> None:
        if self._link is not None:
            self._link.closed = True
        self._link = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("the connection was lost"))
        self._pending.clear()
        self.subscribed = False
        if self.connected:
            self.connected = False
            self._on_connection_change(False)

    # -- receiving ------------------------------------------------------------------------------

    async def _receive(self, link: Link, inbox: Inbox) -> None:
        conn = link.conn
        may_read = self._may_read
        while True:
            if not may_read.is_set():
                log.debug("holding %d unacked messages: paused reading", self._unacked)
                await may_read.wait()
            if link.undispatched:  # decoded before the bound was reached: first in line
                link.undispatched = self._dispatch(link, link.undispatched)
                continue
            data = await conn.read()
            if not data:
                raise SessionEnded("the broker closed the connection")
            self._last_heard = time.monotonic()
            link.undispatched = self._dispatch(link, inbox.feed(data))

    def _dispatch(
        self, link: Link, packets: list[tuple[mqtt5.Packet, int]]
    ) -> list[tuple[mqtt5.Packet, int]]:
        """Handle packets in order until the memory bound is reached; return the rest."""
        now = time.time()
        before = len(self._buffer)
        max_unacked = self.settings.max_unacked
        max_bytes = self.settings.max_unacked_bytes
        rest: list[tuple[mqtt5.Packet, int]] = []
        for index, (packet, size) in enumerate(packets):
            if type(packet) is PublishPacket:
                self._on_publish(link, packet, size, now)
                if self._unacked >= max_unacked or self._unacked_bytes >= max_bytes:
                    self._may_read.clear()
                    rest = packets[index + 1 :]
                    break
            else:
                self._on_control(link, packet)
        if len(self._buffer) != before:
            self._available.set()
        return rest

    def _on_publish(self, link: Link, packet: PublishPacket, size: int, now: float) -> None:
        qos = packet.qos
        if packet.topic_alias is not None:
            raise ProtocolViolation(
                DisconnectReasonCode.TOPIC_ALIAS_INVALID,
                "the broker used a topic alias, which we never allow (Topic Alias Maximum 0)",
            )
        if qos == QoS.EXACTLY_ONCE:
            self._refuse_qos2(link, packet)
            return
        topic = packet.topic
        if self._routes:
            for route in self._routes.values():
                if topic.startswith(route.prefix):
                    self._deliver_routed(link, route, packet)
                    return
        if self.snapshot:
            if not packet.retain:
                return  # live traffic: the main session delivers it (QoS 0: nothing to ack)
            self.last_retained_at = time.monotonic()
            self.retained_received += 1
        self._buffer.append(
            Received(
                topic,
                packet.payload,
                dict(packet.user_properties),
                now,
                packet.retain,
                int(qos),
                packet.message_expiry_interval,  # flespi expires telemetry (issue 8 item 9)
                packet.packet_id or 0,
                size,
                link.epoch,
            )
        )
        self._buffered_bytes += size
        self._unacked += 1
        self._unacked_bytes += size

    def _refuse_qos2(self, link: Link, packet: PublishPacket) -> None:
        self.refused_qos2 += 1
        log.error(
            "refused a QoS 2 message on %s (we subscribe at QoS 1 and never acknowledge QoS 2)",
            packet.topic,
        )
        link.post(
            PubRecPacket(
                packet.packet_id or 0, reason_code=PubRecReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
            ).write()
        )

    def _deliver_routed(self, link: Link, route: _Route, packet: PublishPacket) -> None:
        try:
            route.queue.put_nowait(packet)
        except asyncio.QueueFull:
            log.warning("dropped a message on %s: its consumer's queue is full", packet.topic)
        if packet.qos and packet.packet_id:
            link.post(puback(packet.packet_id))

    def _on_control(self, link: Link, packet: mqtt5.Packet) -> None:
        if isinstance(packet, SubAckPacket | PubAckPacket):
            future = self._pending.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(packet)
            return
        if isinstance(packet, PingRespPacket):
            return
        if isinstance(packet, DisconnectPacket):
            self.last_disconnect_code = int(packet.reason_code)
            raise SessionEnded(self._disconnect_reason(packet))
        if isinstance(packet, PubRelPacket):  # only after a QoS 2 we refused: end that flow
            link.post(mqtt5.PubCompPacket(packet.packet_id).write())
            return
        raise ProtocolViolation(
            DisconnectReasonCode.PROTOCOL_ERROR,
            f"the broker sent an unexpected {type(packet).__name__}",
        )

    @staticmethod
    def _disconnect_reason(packet: DisconnectPacket) -> str:
        code = packet.reason_code
        detail = f": {packet.reason_str}" if packet.reason_str else ""
        if code == DisconnectReasonCode.SESSION_TAKEN_OVER:
            return (
                "the broker disconnected us: another client connected with the same client id "
                f"(DISCONNECT 0x8E){detail}"
            )
        return f"the broker disconnected us: {reason_text(code, packet.reason_str)}"

    # -- keepalive ------------------------------------------------------------------------------

    async def _keepalive(self, link: Link) -> None:
        keepalive = self.keepalive
        if keepalive <= 0:
            await asyncio.Event().wait()  # keepalive off: wait to be cancelled
        tick = min(1.0, keepalive / 10)
        pinged_at = 0.0
        ping = PingReqPacket().write()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if not self._may_read.is_set():
                self._last_heard = now  # we are not reading: the silence is ours
            silent = now - self._last_heard
            if silent >= DEAD_AFTER * keepalive:
                raise SessionEnded(
                    f"nothing heard from the broker for {silent:.1f}s (keepalive {keepalive}s): "
                    "the connection is presumed dead"
                )
            quiet = silent >= keepalive or now - link.last_sent >= keepalive
            if quiet and now - pinged_at >= keepalive / 2:
                pinged_at = now
                link.post(ping)

    # -- subscribing ----------------------------------------------------------------------------

    def _next_packet_id(self) -> int:
        for packet_id in self._packet_ids:
            if packet_id not in self._pending:
                return packet_id
        raise AssertionError("unreachable: the id cycle never ends")

    async def _request(self, link: Link, packet_id: int, data: bytes) -> mqtt5.Packet:
        future: asyncio.Future[mqtt5.Packet] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        if not link.post(data):
            self._pending.pop(packet_id, None)
            raise NotConnected("not connected to the broker")
        return await future  # no timeout: the connection's end fails it (see _disconnected)

    async def _subscribe(self, link: Link) -> None:
        if self.requester:  # its routes only, granted before anything is asked
            await self._subscribe_routes(link, list(self._routes.values()))
            self.subscribed = True
            self.subscribed_event.set()
            return
        qos = 0 if self.snapshot else min(1, self._max_qos)
        # retain_handling=1: retained messages only for a subscription the session lacks, so a
        # reconnect to a persistent session does not replay the whole retained state.
        everything = self._resync or self.snapshot
        handling = (
            RetainHandling.SEND_ALWAYS
            if everything
            else RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS
        )
        filters = self.settings.snapshot_topics if self.snapshot else self.settings.subscriptions
        topic_filters = [
            TopicFilter(f, max_qos=QoS(qos), retain_as_published=False, retain_handling=handling)
            for f in filters
        ]
        packet_id = self._next_packet_id()
        reply = await self._request(
            link, packet_id, SubscribePacket(packet_id, topic_filters).write()
        )
        assert isinstance(reply, SubAckPacket)
        failed = [
            (f, code.name)
            for f, code in zip(filters, reply.reason_codes, strict=False)
            if int(code) >= 0x80
        ]
        if failed:
            log.error("the broker refused subscriptions: %s", failed)
            return
        self._resync = False
        self.retained_requested = everything or not self.session_present
        self.subscribed = True
        self.subscribed_at = time.monotonic()
        self.subscribed_event.set()
        log.info("subscribed to %s", ", ".join(filters))
        if self._routes and not self.snapshot:
            await self._subscribe_routes(link, list(self._routes.values()))

    async def _subscribe_routes(self, link: Link, routes: list[_Route]) -> None:
        packet_id = self._next_packet_id()
        topic_filters = [TopicFilter(r.topic_filter, max_qos=QoS(r.qos)) for r in routes]
        reply = await self._request(
            link, packet_id, SubscribePacket(packet_id, topic_filters).write()
        )
        assert isinstance(reply, SubAckPacket)
        for route, code in zip(routes, reply.reason_codes, strict=False):
            if int(code) >= 0x80:
                log.error(
                    "the broker refused the subscription %s: %s", route.topic_filter, code.name
                )
            else:
                route.ready.set()


_PUBACKS: list[bytes | None] = [None] * 65536


def puback(packet_id: int) -> bytes:
    """PUBACK (success) for ``packet_id``, encoded by the codec once per id and kept: a batch
    of 5,000 acks is then one join (the codec's encoder costs ~1 us a packet)."""
    packet = _PUBACKS[packet_id]
    if packet is None:
        packet = _PUBACKS[packet_id] = PubAckPacket(packet_id).write()
    return packet


def _log_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, NotConnected):
        log.error("MQTT subscription failed: %s", exc)
