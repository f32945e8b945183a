"""MQTT 5 over a byte stream, below the session: framing, the ordered writer, the errors.

Pure or nearly: :class:`Inbox` turns bytes into packets (the ``mqtt5`` codec does the decoding;
this adds the partial-packet buffer, the Maximum Packet Size check and the mapping of the
codec's errors, including its panics, to a DISCONNECT reason); :class:`Link` sends everything
of one connection through one writer, in the order it was posted, coalescing what queued up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import mqtt5
from mqtt5 import ConnAckPacket, ConnAckReasonCode, DisconnectReasonCode

from mirror.session.transport import Connection


class SessionEnded(Exception):
    """The connection ended; the session reconnects. The message says why."""


class ProtocolViolation(SessionEnded):
    """The broker sent something MQTT 5 forbids; we DISCONNECT with ``code`` and reconnect."""

    def __init__(self, code: DisconnectReasonCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectRefused(SessionEnded):
    """The broker answered CONNECT with a failure reason code."""


class NotConnected(Exception):
    """No connection to publish on, or it was lost before the broker acknowledged."""


class PublishRefused(Exception):
    """The broker answered a QoS 1 PUBLISH with a failure reason code."""


class Inbox:
    """Bytes in, whole packets out (with their wire size). Pure: no I/O."""

    def __init__(self, max_packet_bytes: int) -> None:
        self.max_packet_bytes = max_packet_bytes
        self._pending = b""

    def feed(self, data: bytes) -> list[tuple[mqtt5.Packet, int]]:
        buf = self._pending + data if self._pending else data
        view = memoryview(buf)
        end = len(buf)
        pos = 0
        packets: list[tuple[mqtt5.Packet, int]] = []
        read = mqtt5.read
        while pos < end:
            try:
                packet, size = read(view[pos:])
            except IndexError:  # a partial packet: wait for more bytes
                self._check_declared_size(buf, pos)
                break
            except (ValueError, UnicodeDecodeError) as exc:
                raise ProtocolViolation(
                    DisconnectReasonCode.MALFORMED_PACKET, f"malformed packet: {exc}"
                ) from exc
            except BaseException as exc:  # pyo3 panics derive from BaseException
                if type(exc).__name__ != "PanicException":
                    raise
                raise ProtocolViolation(
                    DisconnectReasonCode.MALFORMED_PACKET, f"malformed packet: {exc}"
                ) from None
            packets.append((packet, size))
            pos += size
        view.release()
        self._pending = buf[pos:] if pos < end else b""
        return packets

    def _check_declared_size(self, buf: bytes, pos: int) -> None:
        """Refuse a packet that announces itself larger than Maximum Packet Size before its
        bytes pile up (a broker that ignores the limit must not take our memory)."""
        length, shift, index = 0, 0, pos + 1
        while index < len(buf) and shift <= 21:
            byte = buf[index]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if length + 1 + (index - pos) > self.max_packet_bytes:
                    raise ProtocolViolation(
                        DisconnectReasonCode.PACKET_TOO_LARGE,
                        f"the broker sent a {length}-byte packet; we accept "
                        f"{self.max_packet_bytes} at most",
                    )
                return
            shift += 7
            index += 1


def account_cid_from(connack: ConnAckPacket) -> int | None:
    """flespi's CONNACK user property ``token`` is JSON holding ``cid``, the account id."""
    for name, value in connack.user_properties:
        if name != "token":
            continue
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            cid = json.loads(value).get("cid")
            return int(cid) if cid is not None else None
    return None


class Link:
    """One live connection: its outgoing packets go through one writer, in order."""

    def __init__(self, conn: Connection, epoch: int) -> None:
        self.conn = conn
        self.epoch = epoch
        self.closed = False
        self.last_sent = time.monotonic()
        self.undispatched: list[tuple[mqtt5.Packet, int]] = []  # read past the memory bound
        self._out: list[bytes] = []
        self._wake = asyncio.Event()

    def post(self, data: bytes) -> bool:
        if self.closed:
            return False
        self._out.append(data)
        self._wake.set()
        self.last_sent = time.monotonic()
        return True

    async def writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            chunk = b"".join(self._out)
            self._out.clear()
            await self.conn.send(chunk)

    async def finish(self, last: bytes = b"") -> None:
        """Flush what is queued (plus ``last``) and close the connection."""
        self.closed = True
        chunk = b"".join(self._out) + last
        self._out.clear()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            if chunk:
                await asyncio.wait_for(self.conn.send(chunk), 2.0)
        await self.conn.close()


def reason_text(code: ConnAckReasonCode | DisconnectReasonCode, reason: str | None) -> str:
    """``Not authorized (0x87)``, with the broker's reason string when it sent one."""
    text = f"{code.name.replace('_', ' ').capitalize()} (0x{int(code):02X})"
    return f"{text}: {reason}" if reason else text
