"""The MQTT session against a scripted broker: bytes in, packets out.

Each test plays the broker's side of one connection (``ScriptedBroker`` is the session's byte
stream) and checks what the session writes back. The end-to-end counterparts with a real
Mosquitto are in test_transports.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import mqtt5
import pytest
from mqtt5 import (
    ConnAckPacket,
    ConnectPacket,
    DisconnectPacket,
    DisconnectReasonCode,
    PingReqPacket,
    PingRespPacket,
    PubAckPacket,
    PublishPacket,
    PubRecPacket,
    QoS,
    RetainHandling,
    SubAckPacket,
    SubAckReasonCode,
    SubscribePacket,
)

from mirror.ops.config import Settings
from mirror.session.mqtt import Inbox, ProtocolViolation
from mirror.session.source import MqttSource

P = TypeVar("P")
KIB = 1024


class ScriptedBroker:
    """The broker's end of one connection: what it sends is scripted, what it gets recorded."""

    def __init__(self) -> None:
        self.to_client: asyncio.Queue[bytes] = asyncio.Queue()
        self.writes: list[bytes] = []  # each send() of the session, as written
        self.packets: list[mqtt5.Packet] = []
        self.closed = asyncio.Event()
        self._got = asyncio.Event()
        self._inbox = Inbox(1 << 30)
        self.reads = 0

    # -- the session's side (transport.Connection) --
    async def read(self) -> bytes:
        if self.closed.is_set():
            return b""
        getter = asyncio.ensure_future(self.to_client.get())
        closed = asyncio.ensure_future(self.closed.wait())
        await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
        closed.cancel()
        if not getter.done():
            getter.cancel()
            return b""
        self.reads += 1
        return getter.result()

    async def send(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ConnectionError("closed")
        self.writes.append(data)
        self.packets += [p for p, _ in self._inbox.feed(data)]
        self._got.set()

    async def close(self) -> None:
        self.closed.set()

    # -- the test's side --
    def push(self, *packets: Any) -> None:
        self.to_client.put_nowait(b"".join(p.write() for p in packets))

    def push_bytes(self, data: bytes) -> None:
        self.to_client.put_nowait(data)

    async def expect(self, kind: type[P], timeout: float = 5.0) -> P:
        """The next packet of ``kind`` the session wrote (waiting for it)."""
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for packet in self.packets[seen:]:
                    seen += 1
                    if isinstance(packet, kind):
                        self.packets.remove(packet)
                        return packet
                self._got.clear()
                await self._got.wait()

    def of(self, kind: type[P]) -> list[P]:
        return [p for p in self.packets if isinstance(p, kind)]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mqtt_url": "mqtt://broker.test:1883",
        "client_id": "session-test",
        "max_payload_bytes": 4 * KIB,
        "max_unacked_bytes": 70 * KIB,
        "max_batch_bytes": 70 * KIB,
        "flush_interval": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


class Harness:
    def __init__(self, source: MqttSource, brokers: list[ScriptedBroker]) -> None:
        self.source = source
        self.brokers = brokers


@contextlib.asynccontextmanager
async def session(
    connections: int = 1, *, on_connect: Callable[[ScriptedBroker], None] | None = None, **kw: Any
) -> AsyncIterator[Harness]:
    """A source whose every connection is a new ScriptedBroker (CONNACK sent at once)."""
    brokers: list[ScriptedBroker] = []

    async def connect() -> ScriptedBroker:
        if len(brokers) >= connections:
            raise ConnectionRefusedError("no more scripted connections")
        broker = ScriptedBroker()
        brokers.append(broker)
        (on_connect or (lambda b: b.push(ConnAckPacket())))(broker)
        return broker

    source = MqttSource(settings(**kw), connect=connect)
    task = asyncio.create_task(source.run())
    try:
        yield Harness(source, brokers)
    finally:
        source.close()
        await asyncio.wait_for(task, 10)


async def subscribed(h: Harness, index: int = 0) -> SubscribePacket:
    """Wait for the connection's SUBSCRIBE and grant it."""
    while len(h.brokers) <= index:
        await asyncio.sleep(0.01)
    broker = h.brokers[index]
    sub = await broker.expect(SubscribePacket)
    broker.push(
        SubAckPacket(
            sub.packet_id, [SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * len(sub.topic_filters)
        )
    )
    return sub


def publish(
    packet_id: int, topic: str = "flespi/state/gw/devices/1/telemetry/x", **kw: Any
) -> PublishPacket:
    kw.setdefault("qos", QoS.AT_LEAST_ONCE)
    payload = kw.pop("payload", b"1")
    return PublishPacket(topic, payload, packet_id=packet_id or None, **kw)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_connect_asks_for_receive_maximum_packet_size_and_no_topic_aliases():
    async with session(max_unacked=300, batch_size=100, keepalive=7) as h:
        await until(lambda: bool(h.brokers))
        connect = await h.brokers[0].expect(ConnectPacket)
    assert connect.receive_max == 300
    assert connect.max_packet_size == 70 * KIB  # the byte bound: no packet can exceed it
    assert connect.topic_alias_max == 0
    assert connect.keep_alive == 7
    assert connect.clean_start is False and connect.session_expiry_interval > 0


async def test_subscription_is_qos1_and_waits_for_a_late_suback():
    async with session() as h:
        await until(lambda: bool(h.brokers))
        broker = h.brokers[0]
        sub = await broker.expect(SubscribePacket)
        # A backlog first, the SUBACK well after it: nothing times out meanwhile.
        broker.push(*(publish(i) for i in range(1, 51)))
        await asyncio.sleep(1.0)
        assert not h.source.subscribed and h.source.connected
        broker.push(SubAckPacket(sub.packet_id, [SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE] * 3))
        await until(lambda: h.source.subscribed)
    assert [int(f.max_qos) for f in sub.topic_filters] == [1, 1, 1]
    handling = int(RetainHandling.SEND_IF_SUBSCRIPTION_NOT_EXISTS)
    assert [int(f.retain_handling) for f in sub.topic_filters] == [handling] * 3
    assert h.source.unacked == 50


async def test_pubacks_of_a_committed_batch_go_out_at_once_in_arrival_order():
    async with session() as h:
        await subscribed(h)
        broker = h.brokers[0]
        ids = [7, 3, 9, 1, 65535]
        broker.push(*(publish(i) for i in ids), publish(0, qos=QoS.AT_MOST_ONCE))
        batch = await h.source.take(100, 0.2)
        assert [m.packet_id for m in batch] == [*ids, 0]
        await asyncio.sleep(0.05)
        assert not broker.of(PubAckPacket), "nothing is acked before the batch is written"
        writes_before = len(broker.writes)
        assert batch.ack() == len(ids)
        assert batch.ack() == 0  # a second ack does nothing
        await until(lambda: len(broker.of(PubAckPacket)) == len(ids))
    assert [p.packet_id for p in broker.of(PubAckPacket)] == ids
    ack_writes = [w for w in broker.writes[writes_before:] if w[0] == 0x40]
    assert len(ack_writes) == 1, "one write for the whole batch"
    assert h.source.unacked == 0


async def test_acks_for_messages_of_an_earlier_connection_are_not_sent():
    async with session(connections=2) as h:
        await subscribed(h)
        h.brokers[0].push(publish(5))
        batch = await h.source.take(10, 0.1)
        await h.brokers[0].close()  # the connection drops while the batch is written
        await subscribed(h, 1)
        assert batch.ack() == 0
        await asyncio.sleep(0.05)
        assert not h.brokers[1].of(PubAckPacket)
        assert h.source.unacked == 0


async def test_a_batch_is_bounded_by_bytes_as_well_as_by_count():
    async with session() as h:
        await subscribed(h)
        big = b"x" * (3 * KIB)
        h.brokers[0].push(*(publish(i, payload=big) for i in range(1, 11)))
        await until(lambda: h.source.buffered == 10)
        first = await h.source.take(100, 0.0, max_bytes=10 * KIB)
        second = await h.source.take(100, 0.0, max_bytes=1)  # always at least one message
    assert len(first) == 3 and first.size <= 10 * KIB
    assert len(second) == 1


async def test_reading_pauses_at_the_byte_bound_and_resumes_after_the_ack():
    async with session(max_unacked_bytes=70 * KIB, max_batch_bytes=70 * KIB) as h:
        await subscribed(h)
        broker = h.brokers[0]
        payload = b"y" * (4 * KIB)
        for i in range(1, 41):  # 40 messages of 4 KiB: 160 KiB, over twice the bound
            broker.push(publish(i, payload=payload))
        await until(lambda: h.source.unacked_bytes >= 70 * KIB)
        await asyncio.sleep(0.1)
        held = h.source.unacked
        assert h.source.unacked_bytes < 80 * KIB, "reading stopped at the bound"
        assert not broker.to_client.empty(), "the rest stays with the broker"
        batch = await h.source.take(1000, 0.0, max_bytes=1 << 30)
        assert len(batch) == held
        batch.ack()
        await until(lambda: h.source.unacked > 0)  # reading resumed after the ack
        assert held < 40
        taken = len(batch)
        while taken < 40:
            more = await asyncio.wait_for(h.source.take(1000, 0.0), 2)
            taken += len(more)
            more.ack()
        await until(lambda: len(broker.of(PubAckPacket)) == 40)


async def test_reading_stops_exactly_at_the_message_bound_even_within_one_read():
    async with session(max_unacked=10, batch_size=10) as h:
        await subscribed(h)
        h.brokers[0].push(*(publish(i) for i in range(1, 31)))  # one read, 30 messages
        await until(lambda: h.source.unacked == 10)
        await asyncio.sleep(0.1)
        assert h.source.unacked == 10
        taken = 0
        while taken < 30:
            batch = await asyncio.wait_for(h.source.take(10, 0.0), 2)
            assert h.source.unacked <= 10
            taken += len(batch)
            batch.ack()
        assert taken == 30


async def test_account_cid_comes_from_the_connack_token_property():
    token = json.dumps({"cid": 1234567, "id": 42})
    connack = ConnAckPacket(user_properties=[("token", token), ("subscriptions", "[]")])
    async with session(on_connect=lambda b: b.push(connack)) as h:
        await until(lambda: h.source.connected)
        assert h.source.account_cid == 1234567


async def test_qos2_is_refused_and_never_acknowledged():
    async with session() as h:
        await subscribed(h)
        broker = h.brokers[0]
        broker.push(publish(11, qos=QoS.EXACTLY_ONCE), publish(12))
        refusal = await broker.expect(PubRecPacket)
        batch = await h.source.take(10, 0.1)
        batch.ack()
        await until(lambda: bool(broker.of(PubAckPacket)))
    assert refusal.packet_id == 11 and int(refusal.reason_code) >= 0x80
    assert [m.packet_id for m in batch] == [12]
    assert [p.packet_id for p in broker.of(PubAckPacket)] == [12]
    assert h.source.connected is False  # closed by the harness, never crashed


async def test_a_topic_alias_ends_the_connection_with_0x94_and_a_reconnect():
    async with session(connections=2) as h:
        await subscribed(h)
        h.brokers[0].push(publish(1, topic_alias=1))
        disconnect = await h.brokers[0].expect(DisconnectPacket)
        await subscribed(h, 1)
    assert disconnect.reason_code == DisconnectReasonCode.TOPIC_ALIAS_INVALID
    assert h.source.unacked == 0


# The codec reports a topic's UTF-8 error as "unraisable" before it panics; the session handles
# the panic (the test checks it); the warning is the codec's noise, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "garbage",
    [
        bytes([0x30, 0x05, 0x00, 0x02, 0xFF, 0xFE, 0x00]),  # topic not UTF-8 (codec panics)
        bytes([0x30, 0x06, 0x00, 0x01, 0x61, 0x02, 0x66, 0x00]),  # unknown property 0x66
        bytes([0x00, 0x00]),  # packet type 0 is reserved
    ],
    ids=["invalid-utf8-topic", "unknown-property", "reserved-type"],
)
async def test_a_malformed_packet_ends_the_connection_with_0x81_and_a_reconnect(garbage):
    async with session(connections=2) as h:
        await subscribed(h)
        h.brokers[0].push_bytes(garbage)
        disconnect = await h.brokers[0].expect(DisconnectPacket)
        await subscribed(h, 1)
        h.brokers[1].push(publish(1))
        batch = await h.source.take(10, 0.1)
    assert disconnect.reason_code == DisconnectReasonCode.MALFORMED_PACKET
    assert len(batch) == 1


def test_a_packet_announced_larger_than_the_limit_is_refused_before_it_arrives():
    inbox = Inbox(max_packet_bytes=1000)
    header = bytes([0x30, 0x80, 0x80, 0x04])  # PUBLISH, remaining length 65536
    with pytest.raises(ProtocolViolation) as refused:
        inbox.feed(header + b"\x00" * 100)
    assert refused.value.code == DisconnectReasonCode.PACKET_TOO_LARGE


async def test_session_taken_over_is_logged_as_another_client(caplog):
    caplog.set_level(logging.WARNING, "mirror.session.source")
    async with session(connections=2) as h:
        await subscribed(h)
        h.brokers[0].push(DisconnectPacket(reason_code=DisconnectReasonCode.SESSION_TAKEN_OVER))
        await subscribed(h, 1)
    assert "another client connected with the same client id" in caplog.text


async def test_keepalive_pings_and_a_silent_broker_is_dropped_within_one_and_a_half_keepalives():
    async with session(connections=2, keepalive=1) as h:
        await subscribed(h)
        silent_from = time.monotonic()
        ping = await h.brokers[0].expect(PingReqPacket, timeout=1.5)
        pinged_after = time.monotonic() - silent_from
        await until(lambda: not h.source.connected, timeout=3)
        dropped_after = time.monotonic() - silent_from
        await subscribed(h, 1)
        # An answering broker keeps the connection.
        for _ in range(3):
            await h.brokers[1].expect(PingReqPacket, timeout=1.5)
            h.brokers[1].push(PingRespPacket())
        assert len(h.brokers) == 2
    assert isinstance(ping, PingReqPacket) and pinged_after <= 1.2
    assert 1.0 <= dropped_after <= 1.5 + 0.3  # 1.5 x keepalive, plus one check interval
    assert "presumed dead" in (h.source.ended_reason or "")


async def test_publish_carries_response_topic_correlation_data_and_user_properties():
    async with session() as h:
        await subscribed(h)
        broker = h.brokers[0]
        await h.source.publish(
            "flespi/rest/get/gw/devices/all",
            b"",
            response_topic="mirror/rest/abc",
            correlation_data=b"\x01\x02",
            user_properties=[("response_chunked", "true")],
        )
        sent0 = await broker.expect(PublishPacket)
        publishing = asyncio.create_task(h.source.publish("a/b", b"x", qos=1))
        sent1 = await broker.expect(PublishPacket)
        assert not publishing.done()
        broker.push(PubAckPacket(sent1.packet_id or 0))
        await asyncio.wait_for(publishing, 2)
    assert sent0.qos == QoS.AT_MOST_ONCE and sent0.response_topic == "mirror/rest/abc"
    assert sent0.correlation_data == b"\x01\x02"
    assert sent0.user_properties == [("response_chunked", "true")]
    assert sent1.qos == QoS.AT_LEAST_ONCE and sent1.packet_id


async def test_a_routed_prefix_goes_to_its_queue_not_to_the_pipeline():
    responses: asyncio.Queue[PublishPacket] = asyncio.Queue()
    async with session() as h:
        h.source.route("mirror/rest/abc/#", "mirror/rest/abc/", responses, qos=1)
        await subscribed(h)
        broker = h.brokers[0]
        route_sub = await broker.expect(SubscribePacket)
        broker.push(SubAckPacket(route_sub.packet_id, [SubAckReasonCode.GRANTED_QOS_AT_LEAST_ONCE]))
        broker.push(publish(21, topic="mirror/rest/abc/1", correlation_data=b"c1"), publish(22))
        routed = await asyncio.wait_for(responses.get(), 2)
        ack = await broker.expect(PubAckPacket)
        batch = await h.source.take(10, 0.1)
    assert [f.pattern for f in route_sub.topic_filters] == ["mirror/rest/abc/#"]
    assert routed.topic == "mirror/rest/abc/1" and routed.correlation_data == b"c1"
    assert ack.packet_id == 21  # acked at once: not mirror data
    assert [m.packet_id for m in batch] == [22]
