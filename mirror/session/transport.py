"""Byte streams to the broker: MQTT over TCP, TLS, WebSockets and WebSockets over TLS.

The session (``source.py``) speaks MQTT over any :class:`Connection`: a duplex byte stream with
``read``/``send``/``close``. Keeping the transport this small is what lets the session be unit
tested against a scripted broker (a :class:`Connection` fed with bytes) and run unchanged over
all four URL schemes.

Flow control is the reader's: a session that stops calling :meth:`Connection.read` stops the
socket being read (asyncio's stream buffer, or the WebSocket library's receive queue, fills and
pauses the transport), so TCP tells the broker to hold off. WebSocket pings are off: MQTT's own
keepalive (PINGREQ) is what detects a dead connection, over every transport alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Protocol

import websockets
from websockets.asyncio.client import ClientConnection

from mirror.ops.config import BrokerAddress

READ_CHUNK = 256 * 1024
CONNECT_TIMEOUT = 30.0


class Connection(Protocol):
    """A duplex byte stream carrying MQTT packets."""

    async def read(self) -> bytes:
        """The next bytes from the broker; ``b""`` once the connection is closed."""
        ...

    async def send(self, data: bytes) -> None:
        """Write ``data`` (one or more whole packets) and wait until it is handed to the OS."""
        ...

    async def close(self) -> None: ...


class StreamConnection:
    """MQTT over TCP or TLS (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(READ_CHUNK)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)


class WebSocketConnection:
    """MQTT over WebSockets (subprotocol ``mqtt``, binary messages), plain or TLS."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws

    async def read(self) -> bytes:
        try:
            message = await self._ws.recv()
        except websockets.ConnectionClosed:
            return b""
        if isinstance(message, str):  # MQTT is binary; a text frame is a broker fault
            raise ConnectionError("the broker sent a WebSocket text frame; MQTT needs binary")
        return message

    async def send(self, data: bytes) -> None:
        try:
            await self._ws.send(data)
        except websockets.ConnectionClosed as exc:
            raise ConnectionError(f"WebSocket closed: {exc}") from exc

    async def close(self) -> None:
        with contextlib.suppress(OSError, TimeoutError, websockets.WebSocketException):
            await asyncio.wait_for(self._ws.close(), 2.0)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verified TLS: the system's CAs, or only ``ca_file``'s when given; hostname checked."""
    return ssl.create_default_context(cafile=ca_file)


async def open_connection(
    broker: BrokerAddress,
    *,
    ca_file: str | None = None,
    max_message_bytes: int | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Connection:
    """Connect to ``broker`` over its URL's transport. Raises ``OSError`` (or a TLS or
    WebSocket handshake error, an ``OSError`` too) when the broker cannot be reached."""
    context = tls_context(ca_file) if broker.tls else None
    async with asyncio.timeout(timeout):
        if not broker.websocket:
            reader, writer = await asyncio.open_connection(
                broker.host, broker.port, ssl=context, limit=READ_CHUNK
            )
            return StreamConnection(reader, writer)
        try:
            ws = await websockets.connect(
                broker.websocket_url,
                subprotocols=[websockets.Subprotocol("mqtt")],
                ssl=context,
                compression=None,
                ping_interval=None,
                max_size=max_message_bytes,
                open_timeout=None,
            )
        except websockets.InvalidHandshake as exc:
            raise ConnectionError(f"WebSocket handshake with {broker.host} failed: {exc}") from exc
        return WebSocketConnection(ws)
