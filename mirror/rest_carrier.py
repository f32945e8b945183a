"""A REST-over-MQTT client carried by an MQTT session of its own (aiomqtt).

The standalone ``backfill`` and ``reconcile`` commands use it beside a running daemon: its own
client id and a clean session, so it never takes over the daemon's persistent session, and the
same broker and token as the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mirror.config import Settings
from mirror.rest import RequestProperties, ResponseMessage, RestClient, RestOptions


def response_message(message: aiomqtt.Message) -> ResponseMessage:
    props = message.properties
    user = dict(getattr(props, "UserProperty", None) or [])
    payload = message.payload
    body = payload if isinstance(payload, bytes | bytearray) else str(payload or "").encode()
    return ResponseMessage(
        str(message.topic), bytes(body), getattr(props, "CorrelationData", None), user
    )


def request_properties(properties: RequestProperties) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = properties.response_topic
    props.CorrelationData = properties.correlation_data
    if properties.user_properties:
        props.UserProperty = list(properties.user_properties)
    return props


def _client(settings: Settings) -> aiomqtt.Client:
    broker = settings.broker
    token = settings.token.reveal() or None
    tls_context = ssl.create_default_context(cafile=settings.ca_file) if broker.tls else None
    return aiomqtt.Client(
        hostname=broker.host,
        port=broker.port,
        username=None if settings.token_in_password else token,
        password=token if settings.token_in_password else None,
        identifier=f"{settings.effective_client_id()}-rest-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        tls_context=tls_context,
        timeout=30,
    )


@contextlib.asynccontextmanager
async def standalone_rest_client(
    settings: Settings, options: RestOptions | None = None
) -> AsyncIterator[RestClient]:
    """Connect, subscribe to the private response topics, and yield a ready RestClient."""
    async with _client(settings) as mqtt:

        async def publish(topic: str, payload: bytes, properties: RequestProperties) -> None:
            await mqtt.publish(topic, payload, qos=1, properties=request_properties(properties))

        rest = RestClient(publish, options=options)
        await mqtt.subscribe(rest.subscription, qos=1)

        async def read() -> Any:
            async for message in mqtt.messages:
                rest.feed(response_message(message))

        reader = asyncio.create_task(read(), name="rest-responses")
        try:
            yield rest
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
