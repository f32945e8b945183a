"""Carriers for the REST-over-MQTT client, both on the mirror's own MQTT session.

The daemon's gap repair rides on the daemon's session (:func:`session_rest_client`): requests
are published through ``MqttSource.publish`` and the private response topics are routed to the
client instead of the pipeline, so the same session and token serve the live stream and REST.

The standalone ``backfill`` and ``reconcile`` commands run beside a running daemon and must not
take over its persistent session, so they open a requester session (:func:`standalone_rest_client`):
the same ``MqttSource`` under a client id of its own, with a clean start, subscribed to the
response topics only. One session implementation thus serves the whole product.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import mqtt5

from mirror.ops.config import Settings
from mirror.ops.failures import BrokerUnreachable
from mirror.repair.rest import RequestProperties, ResponseMessage, RestClient, RestOptions
from mirror.session.source import MqttSource

CONNECT_TIMEOUT = 30.0  # a standalone command gives up on a broker it cannot reach this soon


@contextlib.asynccontextmanager
async def session_rest_client(
    source: MqttSource,
    options: RestOptions | None = None,
    connect_timeout: float | None = None,
    session: asyncio.Task[None] | None = None,
) -> AsyncIterator[RestClient]:
    """A RestClient publishing through ``source``, fed by a route of its answers. With
    ``connect_timeout``, the route's subscription must be granted that soon, and before the
    ``session`` task (the source's run) ends."""

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
    ready = source.route(rest.subscription, prefix, answers, qos=1)
    # The answers' subscription first, then any request (an answer before it would be lost).
    granted = asyncio.ensure_future(ready.wait())
    waited = {granted} if session is None else {granted, session}
    try:
        await asyncio.wait(waited, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        granted.cancel()
    if not ready.is_set():
        source.unroute(prefix)
        why = source.ended_reason or "no subscription granted"
        raise BrokerUnreachable(
            f"no session with the broker at {source.settings.broker} ({why}): check "
            "--mqtt-url, the token and that the broker runs"
        )

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
        await asyncio.wait([reader])  # its end, without swallowing a cancellation of ours


@contextlib.asynccontextmanager
async def standalone_rest_client(
    settings: Settings, options: RestOptions | None = None
) -> AsyncIterator[RestClient]:
    """Open a requester session of our own and yield a RestClient on it, once the broker has
    granted its response topics (:class:`BrokerUnreachable` after ``CONNECT_TIMEOUT``)."""
    source = MqttSource(settings, requester=True)
    session = asyncio.create_task(source.run(), name="rest-session")
    # A first connection that fails ends the session at once: no need to wait for the timeout.
    session.add_done_callback(lambda _: source.close())
    try:
        async with session_rest_client(source, options, CONNECT_TIMEOUT, session) as rest:
            yield rest
    finally:
        source.close()
        await asyncio.wait([session])
