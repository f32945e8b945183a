"""Just enough of MQTT 5's wire format for the hot path: PUBLISH in, PUBACKs out.

paho turns every PUBLISH into an ``MQTTMessage`` with a generic ``Properties`` object (built by
reflection, per property) and then walks its topic-filter tree for per-filter callbacks we
never register. Profiling showed that to be half of the daemon's CPU, so ``source.py`` reads
the few fields it needs straight from the packet with :func:`parse_publish`. Anything unusual
(QoS 2, a topic alias, an unknown property, a malformed packet) returns None and paho's own
handler takes the packet, so correctness never rests on this shortcut alone.

Pure: bytes in, values out. Tested against paho's own encoder.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PUBACK = 0x40
USER_PROPERTY = 0x26
_SKIP_FIXED = {0x01: 1, 0x02: 4}  # payload format indicator, message expiry interval
_SKIP_BINARY = {0x03, 0x08, 0x09}  # content type, response topic, correlation data
SUBSCRIPTION_IDENTIFIER = 0x0B


@dataclass(frozen=True, slots=True)
class Publish:
    topic: bytes
    payload: bytes
    properties: dict[str, str]
    mid: int
    qos: int
    retain: bool


def parse_publish(command: int, packet: bytes | bytearray) -> Publish | None:
    """Decode an MQTT 5 PUBLISH (fixed-header byte and the rest), or None to let paho do it."""
    qos = (command & 0x06) >> 1
    if qos > 1:
        return None
    try:
        topic_len = (packet[0] << 8) | packet[1]
        pos = 2 + topic_len
        topic = bytes(packet[2:pos])
        if len(topic) != topic_len:
            return None
        mid = 0
        if qos:
            mid = (packet[pos] << 8) | packet[pos + 1]
            pos += 2
        length, shift = 0, 0
        while True:  # property length: a variable byte integer
            byte = packet[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 21:
                return None
        end = pos + length
        if end > len(packet):
            return None
        properties: dict[str, str] = {}
        while pos < end:
            ident = packet[pos]
            pos += 1
            if ident == USER_PROPERTY:
                klen = (packet[pos] << 8) | packet[pos + 1]
                key = bytes(packet[pos + 2 : pos + 2 + klen]).decode("utf-8", "replace")
                pos += 2 + klen
                vlen = (packet[pos] << 8) | packet[pos + 1]
                properties[key] = bytes(packet[pos + 2 : pos + 2 + vlen]).decode("utf-8", "replace")
                pos += 2 + vlen
            elif ident in _SKIP_FIXED:
                pos += _SKIP_FIXED[ident]
            elif ident in _SKIP_BINARY:
                pos += 2 + ((packet[pos] << 8) | packet[pos + 1])
            elif ident == SUBSCRIPTION_IDENTIFIER:
                while packet[pos] & 0x80:
                    pos += 1
                pos += 1
            else:  # topic alias (0x23) or anything else: paho's full handling
                return None
        if pos != end:
            return None
    except IndexError:
        return None
    return Publish(topic, bytes(packet[end:]), properties, mid, qos, bool(command & 0x01))


def pubacks(mids: list[int]) -> bytes:
    """PUBACK packets (success, no properties) for ``mids``, in order, as one write."""
    return b"".join(struct.pack("!BBH", PUBACK, 2, mid) for mid in mids)
