"""Our PUBLISH reader agrees with paho's decoder, and hands paho whatever it does not know."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt._packet import decode_publish
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mirror.wire import PUBACK, parse_publish, pubacks

# Strings paho accepts: MQTT calls U+0000 and U+FEFF in a UTF-8 string malformed.
text = st.text(
    alphabet=st.characters(blacklist_characters="\x00\ufeff", codec="utf-8"), max_size=30
)


def build(
    topic: bytes, payload: bytes, qos: int, retain: bool, mid: int, props: Properties | None
) -> tuple[int, bytes]:
    command = 0x30 | (qos << 1) | int(retain)
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    body += props.pack() if props is not None else b"\x00"
    return command, body + payload


@st.composite
def publish_properties(draw) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    users = draw(st.lists(st.tuples(text, text), max_size=4))
    if users:
        props.UserProperty = users
    if draw(st.booleans()):
        props.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        props.PayloadFormatIndicator = draw(st.integers(0, 1))
    if draw(st.booleans()):
        props.ContentType = draw(text)
    if draw(st.booleans()):
        props.ResponseTopic = draw(text.filter(bool))
    if draw(st.booleans()):
        props.CorrelationData = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        props.SubscriptionIdentifier = [draw(st.integers(1, 268_435_455))]
    return props


@settings(max_examples=500, deadline=None)
@given(
    topic=st.text(min_size=1, max_size=60).map(str.encode),
    payload=st.binary(max_size=300),
    qos=st.integers(0, 1),
    retain=st.booleans(),
    mid=st.integers(1, 65535),
    props=publish_properties(),
)
def test_parse_publish_agrees_with_paho(topic, payload, qos, retain, mid, props):
    command, packet = build(topic, payload, qos, retain, mid, props)
    ours = parse_publish(command, packet)
    theirs = decode_publish(command, packet, MQTTProtocolVersion.MQTTv5)
    assert ours is not None
    assert ours.topic == theirs.topic
    assert ours.payload == theirs.payload
    assert ours.qos == theirs.qos and ours.retain == theirs.retain
    assert ours.mid == (theirs.mid if qos else 0)
    expected = dict(getattr(theirs.properties, "UserProperty", []) or [])
    assert ours.properties == expected


def test_flespi_like_publish_with_timestamp_and_cid():
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("timestamp", "1731990000.25"), ("cid", "123")]
    command, packet = build(b"flespi/state/gw/devices/1/telemetry/x", b"42", 1, True, 7, props)
    parsed = parse_publish(command, packet)
    assert parsed is not None
    assert (parsed.topic, parsed.payload, parsed.mid, parsed.retain) == (
        b"flespi/state/gw/devices/1/telemetry/x", b"42", 7, True,
    )  # fmt: skip
    assert parsed.properties == {"timestamp": "1731990000.25", "cid": "123"}


def test_qos_2_topic_aliases_and_broken_packets_are_left_to_paho():
    assert parse_publish(0x34, b"\x00\x01a\x00\x01\x00") is None  # QoS 2
    alias = Properties(PacketTypes.PUBLISH)
    alias.TopicAlias = 3
    command, packet = build(b"a", b"x", 1, False, 1, alias)
    assert parse_publish(command, packet) is None
    command, packet = build(b"abc", b"x", 1, False, 1, None)
    assert parse_publish(command, packet[:4]) is None  # truncated
    assert parse_publish(0x30, b"\x00\x09ab") is None  # topic longer than the packet
    assert parse_publish(0x30, b"\x00\x01a\x05\x26\x00") is None  # properties run past the end


@given(st.integers(0, 3), st.binary(max_size=40))
def test_parse_publish_never_raises(qos_bits, packet):
    parse_publish(0x30 | (qos_bits << 1), packet)


def test_pubacks_are_concatenated_in_order():
    assert pubacks([1, 258]) == bytes([PUBACK, 2, 0, 1, PUBACK, 2, 1, 2])


def test_a_nul_in_a_user_property_does_not_break_the_connection():
    """paho raises on it (and would drop the connection, to be sent the same packet again);
    we read it, and the decoder dead-letters the message for its bad timestamp."""
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("timestamp", "17\x0031")]
    command, packet = build(b"flespi/state/gw/devices/1/telemetry/x", b"1", 1, False, 9, props)
    parsed = parse_publish(command, packet)
    assert parsed is not None and parsed.properties == {"timestamp": "17\x0031"}
