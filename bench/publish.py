"""A fast flespi-like publisher, run as separate processes so it never shares the consumer's CPU.

``python -m bench.publish --url mqtt://127.0.0.1:PORT --count N --part K --parts P [--rate R]``
publishes messages ``K, K+P, K+2P, ...`` below ``N`` of the benchmark mix at QoS 1 and prints one
JSON line ``{"published": n, "elapsed": s}`` once the broker has acknowledged every one.

It speaks MQTT 5 over a plain socket (CONNECT, PUBLISH QoS 1 with the ``cid`` and ``timestamp``
user properties, PUBACK) instead of using paho: paho's Python publish path tops out at a few
thousand QoS 1 messages/s here, which would make building a backlog the slowest part of the
benchmark. At most ``WINDOW`` publications are unacknowledged at any time (bounded in-flight,
never a wait per message).

With ``--rate`` it paces itself to R messages/s (its share of the total rate) and stamps the
``timestamp`` user property with the real publish time, for latency measurements. Without it the
timestamp is ``start + i µs``: distinct and increasing, so the newest value always wins.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import struct
import time
import uuid

from bench.workload import CID, Mix, host_port

WINDOW = 2000
CHUNK = 200


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str) -> bytes:
    # protocol name, level 5, flags: clean start; keepalive 60; no properties.
    variable = _str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + _varint(0)
    body = variable + _str(client_id)
    return b"\x10" + _varint(len(body)) + body


_CID_PROP = b"\x26" + _str("cid") + _str(CID)
_TS_KEY = b"\x26" + _str("timestamp")


def publish_packet(topic: str, payload: bytes, packet_id: int, ts: float, retain: bool) -> bytes:
    props = _CID_PROP + _TS_KEY + _str(repr(ts))
    body = _str(topic) + struct.pack("!H", packet_id) + _varint(len(props)) + props + payload
    return (b"\x33" if retain else b"\x32") + _varint(len(body)) + body


class _Reader:
    """Splits the byte stream from the broker into packets: (first byte, body)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        packets = []
        while len(self.buf) >= 2:
            length, mult, pos = 0, 1, 1
            while True:
                if pos >= len(self.buf):
                    return packets
                byte = self.buf[pos]
                length += (byte & 0x7F) * mult
                mult *= 128
                pos += 1
                if not byte & 0x80:
                    break
            if len(self.buf) < pos + length:
                return packets
            packets.append((self.buf[0], bytes(self.buf[pos : pos + length])))
            del self.buf[: pos + length]
        return packets


def publish(
    url: str,
    count: int,
    part: int,
    parts: int,
    *,
    rate: float = 0.0,
    retained: bool = False,
    devices: int = 1000,
    seed: int = 1,
) -> dict[str, float]:
    mix = Mix(devices=devices, retained=retained)
    rnd = random.Random(seed * 1000 + part)
    indices = range(part, count, parts)
    total = len(indices)
    sock = socket.create_connection(host_port(url))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"bench-pub-{uuid.uuid4().hex[:8]}"))
    reader = _Reader()
    connack = None
    while connack is None:
        for first, body in reader.feed(sock.recv(4096)):
            if first == 0x20:
                connack = body
    if connack[1] != 0:
        raise RuntimeError(f"CONNACK refused: reason {connack[1]:#x}")
    share = rate / parts if rate > 0 else 0.0
    started = time.time()
    sent = acked = 0
    try:
        while acked < total:
            room = min(WINDOW - (sent - acked), total - sent, CHUNK)
            if share:
                room = min(room, int((time.time() - started) * share) + 1 - sent)
            if room > 0:
                chunk = []
                now = time.time()
                for n in range(sent, sent + room):
                    i = indices[n]
                    topic, payload = mix.message(i, rnd, now)
                    ts = now if share else started + i * 1e-6
                    chunk.append(publish_packet(topic, payload, n % 65535 + 1, ts, retained))
                sock.sendall(b"".join(chunk))
                sent += room
            must_wait = sent - acked >= WINDOW or sent == total
            timeout = 1.0 if must_wait else (0.002 if share else 0.0)
            readable, _, _ = select.select([sock], [], [], timeout)
            if readable:
                data = sock.recv(1 << 16)
                if not data:
                    raise RuntimeError("the broker closed the connection")
                for first, _body in reader.feed(data):
                    if first >> 4 == 4:  # PUBACK
                        acked += 1
        elapsed = time.time() - started
        sock.sendall(b"\xe0\x00")  # DISCONNECT
    finally:
        sock.close()
    return {"published": total, "elapsed": elapsed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--parts", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--retained", action="store_true")
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    result = publish(
        a.url,
        a.count,
        a.part,
        a.parts,
        rate=a.rate,
        retained=a.retained,
        devices=a.devices,
        seed=a.seed,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
