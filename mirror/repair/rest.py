"""flespi's REST API over MQTT: request/response with correlation, chunks, timeouts, retries.

flespi answers a publish to ``flespi/rest/{method}/{api-uri}`` (the JSON ``data`` as payload) on
the MQTT 5 Response Topic, echoing the Correlation Data; with the user property
``response_chunked: true`` a large answer comes as several messages and the last one carries
the user property ``http_code`` (flespi.com/mqtt-api, flespi.com/blog/mqtt-scores-again-flespi-
rest-api-over-mqtt). The body is flespi's REST envelope: ``{"result": [...]}`` or
``{"errors": [{"code", "reason"}]}``.

This module owns no MQTT session. It is given an async ``publish(topic, payload, properties)``
and is fed the messages that arrive on its response topics (``feed``), so the daemon's own
session, a standalone aiomqtt client or a test can carry it. Every request gets its own
response topic under a private prefix *and* its own correlation data, so an answer is matched
even when one of the two does not come back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mirror.ops import metrics

log = logging.getLogger(__name__)

REQUEST_PREFIX = "flespi/rest"
RETRYABLE_CODES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RequestProperties:
    """The MQTT 5 properties a REST request is published with."""

    response_topic: str
    correlation_data: bytes
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ResponseMessage:
    """One message received on a response topic (a whole answer or one chunk of it)."""

    topic: str
    payload: bytes
    correlation_data: bytes | None = None
    user_properties: Mapping[str, str] = field(default_factory=dict)


Publish = Callable[[str, bytes, RequestProperties], Awaitable[None]]


class RestError(Exception):
    """flespi answered with an error (``http_code`` >= 400), or never answered (``http_code`` 0)."""

    def __init__(self, method: str, uri: str, http_code: int, reason: str, attempts: int) -> None:
        self.method = method
        self.uri = uri
        self.http_code = http_code
        self.reason = reason
        self.attempts = attempts
        answer = f"HTTP {http_code}" if http_code else "no answer"
        super().__init__(
            f"REST {method.upper()} {uri}: {answer}: {reason} "
            f"(after {attempts} attempt{'s' if attempts != 1 else ''})"
        )


class RestTimeout(RestError):
    """No complete answer within the request timeout, on every attempt."""


class _NotSent(Exception):
    """The carrier could not publish a request (retried like a missing answer)."""


@dataclass(frozen=True)
class RestResponse:
    http_code: int
    body: Any  # the decoded JSON envelope

    @property
    def result(self) -> list[Any]:
        result = self.body.get("result", []) if isinstance(self.body, dict) else []
        return result if isinstance(result, list) else [result]

    @property
    def error_reason(self) -> str:
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        if isinstance(errors, list) and errors:
            return "; ".join(
                str(e.get("reason", e)) if isinstance(e, dict) else str(e) for e in errors
            )[:300]
        return "no reason given"


def assemble(chunks: list[bytes], http_code: int | None) -> RestResponse:
    """Join an answer's chunks into one response.

    How flespi cuts a chunked answer is UNCONFIRMED, so both readings are accepted: the chunks
    are consecutive pieces of one JSON body (joined, they parse), or each chunk is an envelope
    of its own (their ``result`` lists are concatenated, their ``errors`` too).
    """
    joined = b"".join(chunks)
    try:
        body: Any = json.loads(joined) if joined else {}
    except ValueError:
        body = _merge_envelopes(chunks)
    if http_code is None:
        http_code = 400 if isinstance(body, dict) and body.get("errors") else 200
    return RestResponse(http_code, body)


def _merge_envelopes(chunks: list[bytes]) -> dict[str, Any]:
    merged: dict[str, list[Any]] = {"result": [], "errors": []}
    for chunk in chunks:
        try:
            part = json.loads(chunk)
        except ValueError:
            return {"errors": [{"reason": "the answer is not JSON"}]}
        if isinstance(part, dict):
            for name in ("result", "errors"):
                value = part.get(name) or []
                merged[name].extend(value if isinstance(value, list) else [value])
    return {name: value for name, value in merged.items() if value or name == "result"}


@dataclass
class _Pending:
    future: asyncio.Future[RestResponse]
    chunks: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class RestOptions:
    timeout: float = 30.0  # seconds for one attempt, first byte to last chunk
    attempts: int = 4  # including the first
    backoff: float = 0.5  # seconds before the first retry; doubles, with jitter
    max_backoff: float = 10.0
    concurrency: int = 4  # requests in flight at once
    chunked: bool = True  # ask for chunked answers (large message pages)
    response_cid: int | None = None  # answer as this subaccount (flespi's response_cid)


class RestClient:
    """Calls flespi's REST API through a publish function; answers arrive through ``feed``."""

    def __init__(
        self,
        publish: Publish,
        response_prefix: str | None = None,
        options: RestOptions | None = None,
    ) -> None:
        self._publish = publish
        self.response_prefix = response_prefix or f"flespi-mirror/rest/{uuid.uuid4().hex}"
        self.options = options or RestOptions()
        self._pending: dict[bytes, _Pending] = {}
        self._slots = asyncio.Semaphore(self.options.concurrency)

    @property
    def subscription(self) -> str:
        """The filter the carrier must subscribe to (QoS 1) before the first request."""
        return f"{self.response_prefix}/+"

    def feed(self, message: ResponseMessage) -> bool:
        """Take one received message; True when it belonged to this client."""
        if not message.topic.startswith(self.response_prefix + "/"):
            return False
        key = message.correlation_data or message.topic.rsplit("/", 1)[-1].encode()
        pending = self._pending.get(key)
        if pending is None or pending.future.done():
            return True  # a late chunk of an answer we gave up on
        pending.chunks.append(message.payload)
        code = message.user_properties.get("http_code")
        if code is None and self.options.chunked:
            return True  # more chunks to come
        try:
            http_code = int(code) if code is not None else None
        except ValueError:
            http_code = 502
        pending.future.set_result(assemble(pending.chunks, http_code))
        return True

    async def get(self, uri: str, data: Mapping[str, Any] | None = None) -> list[Any]:
        """GET ``uri`` and return the envelope's ``result`` list."""
        return (await self.call("get", uri, data)).result

    async def call(
        self, method: str, uri: str, data: Mapping[str, Any] | None = None
    ) -> RestResponse:
        """One REST call, retried on timeouts and on 5xx/429 with backoff; raises RestError."""
        opts = self.options
        delay = opts.backoff
        async with self._slots:
            attempt = 1
            while True:
                started = time.monotonic()
                try:
                    response = await self._attempt(method, uri, data)
                except TimeoutError:
                    code, reason = 0, f"no complete answer within {opts.timeout:g}s"
                except _NotSent as exc:
                    code, reason = 0, f"could not publish the request: {exc}"
                else:
                    metrics.REST_DURATION.observe(time.monotonic() - started)
                    if response.http_code < 400:
                        metrics.REST_REQUESTS.labels("ok").inc()
                        return response
                    code, reason = response.http_code, response.error_reason
                retryable = code == 0 or code in RETRYABLE_CODES
                if not retryable or attempt >= opts.attempts:
                    break
                metrics.REST_REQUESTS.labels("retried").inc()
                log.info(
                    "REST %s %s: %s (%s); retrying in %.1fs",
                    method.upper(), uri, reason, code or "no answer", delay,
                )
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(opts.max_backoff, delay * 2)
                attempt += 1
        error_type = RestTimeout if code == 0 else RestError
        metrics.REST_REQUESTS.labels("timeout" if code == 0 else "error").inc()
        error = error_type(method, uri, code, reason, attempt)
        log.error("%s", error)
        raise error

    async def _attempt(
        self, method: str, uri: str, data: Mapping[str, Any] | None
    ) -> RestResponse:
        request_id = uuid.uuid4().hex.encode()
        loop = asyncio.get_running_loop()
        pending = _Pending(loop.create_future())
        self._pending[request_id] = pending
        user: list[tuple[str, str]] = []
        if self.options.chunked:
            user.append(("response_chunked", "true"))
        if self.options.response_cid is not None:
            user.append(("response_cid", str(self.options.response_cid)))
        properties = RequestProperties(
            f"{self.response_prefix}/{request_id.decode()}", request_id, tuple(user)
        )
        payload = json.dumps(dict(data), separators=(",", ":")).encode() if data else b""
        try:
            metrics.REST_IN_FLIGHT.inc()
            try:
                await self._publish(
                    f"{REQUEST_PREFIX}/{method.lower()}/{uri}", payload, properties
                )
            except Exception as exc:  # whatever the carrier raises: not connected, refused
                raise _NotSent(str(exc) or type(exc).__name__) from exc
            return await asyncio.wait_for(asyncio.shield(pending.future), self.options.timeout)
        finally:
            metrics.REST_IN_FLIGHT.dec()
            self._pending.pop(request_id, None)
            if not pending.future.done():
                pending.future.cancel()


__all__ = [
    "RequestProperties",
    "ResponseMessage",
    "RestClient",
    "RestError",
    "RestOptions",
    "RestResponse",
    "RestTimeout",
    "assemble",
]
