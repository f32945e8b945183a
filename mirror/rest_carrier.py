"""Carriers for the REST-over-MQTT client: the daemon's own session, or one of its own.

The daemon's gap repair rides on the daemon's session (:func:`session_rest_client`): requests
are published through ``MqttSource.publish`` and the private response topics are routed to the
client instead of the pipeline, so the same session and token serve the live stream and REST.

The standalone ``backfill`` and ``reconcile`` commands run beside a running daemon and must not
take over its persistent session, so they connect with a client id of their own and a clean
session (:func:`standalone_rest_client`, aiomqtt), to the same broker with the same token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import mqtt5
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mirror.config import Settings
from mirror.rest import RequestProperties, ResponseMessage, RestClient, RestOptions
from mirror.source import MqttSource


@contextlib.asynccontextmanager
async def session_rest_client(
    source: MqttSource, options: RestOptions | None = None
) -> AsyncIterator[RestClient]:
    """A RestClient publishing through the daemon's session, fed by a route of its answers."""

    async def publish(topic: str, payload: bytes, properties: RequestProperties) -> None:
        await source.publish(
            topic,
            payload,
            qos=1,
            response_topic=properties.response_topic,
            correlation_data=properties.correlation_data,
            user_properties=properties.user_properties,
        )

    rest = RestClient(publish, options=options)
    answers: asyncio.Queue[mqtt5.PublishPacket] = asyncio.Queue()  # bounded by the concurrency
    prefix = rest.response_prefix + "/"
    source.route(rest.subscription, prefix, answers, qos=1)

    async def read() -> None:
        while True:
            packet = await answers.get()
            user = dict(packet.user_properties or [])
            rest.feed(ResponseMessage(packet.topic, bytes(packet.payload),
                                      packet.correlation_data, user))

    reader = asyncio.create_task(read(), name="rest-answers")
    try:
        yield rest
    finally:
        source.unroute(prefix)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


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
        transport="websockets" if broker.websocket else "tcp",
        websocket_path=broker.path if broker.websocket else None,
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
