"""Every metric the mirror exports, defined once, plus the HTTP listener that serves them.

Label values come from bounded sets only (topic family, table, operation, reason, QoS): never a
device id or a topic. The listener serves ``/metrics``, ``/healthz`` and ``/readyz`` and nothing
else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from mirror import __version__
from mirror.decode.records import (
    Reason,
)

log = logging.getLogger(__name__)

PREFIX = "flespi_mirror"
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Gauges say how to combine values across worker processes (--workers, prometheus-client's
# multiprocess mode); in a single process the mode changes nothing.
BUILD_INFO = Gauge(
    f"{PREFIX}_build_info",
    "Version of the running mirror (always 1).",
    ["version"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
BUILD_INFO.labels(__version__).set(1)

MESSAGES_RECEIVED = Counter(
    f"{PREFIX}_messages_received_total",
    "MQTT messages taken into a batch, by topic family and QoS.",
    ["family", "qos"],
    registry=REGISTRY,
)
ROWS_WRITTEN = Counter(
    f"{PREFIX}_rows_written_total",
    "Rows written by committed transactions, by table and operation "
    "(upsert, delete, append; stale = an update older than the stored row, not applied; "
    "duplicate = a history message already stored).",
    ["table", "operation"],
    registry=REGISTRY,
)
SUPERSEDED = Counter(
    f"{PREFIX}_records_superseded_total",
    "Records dropped inside a batch because a newer record for the same key was in it.",
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    f"{PREFIX}_dead_letters_total",
    "Messages that could not be mirrored and went to the dead_letters table, by reason.",
    ["reason"],
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    f"{PREFIX}_batch_messages",
    "Messages per committed batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000),
    registry=REGISTRY,
)
COMMIT_DURATION = Histogram(
    f"{PREFIX}_commit_duration_seconds",
    "Time to write and commit one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
LAG = Histogram(
    f"{PREFIX}_lag_seconds",
    "End-to-end lag: commit time minus when flespi published the message (server.timestamp "
    "of device and channel messages, the 'timestamp' user property of state updates); "
    "retained messages and device time are not lag.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
    registry=REGISTRY,
)
UNACKED = Gauge(
    f"{PREFIX}_unacked_messages",
    "Messages received from the broker and not yet acknowledged.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
OLDEST_UNACKED_AGE = Gauge(
    f"{PREFIX}_oldest_unacked_age_seconds",
    "Age of the oldest message received and not yet acknowledged (0 when none): shows a stalled "
    "database while it happens, before the lag histogram can.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
RECONNECTS = Counter(
    f"{PREFIX}_reconnects_total",
    "MQTT reconnect attempts after a lost or failed connection.",
    registry=REGISTRY,
)
MQTT_SESSION_PRESENT = Gauge(
    f"{PREFIX}_mqtt_session_present",
    "1 when the broker resumed the persistent session on the last connect (0: a new session, "
    "retained state replayed).",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
MQTT_CONNECTED = Gauge(
    f"{PREFIX}_mqtt_connected",
    "1 while the MQTT session is connected (with workers: all of them).",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
READY = Gauge(
    f"{PREFIX}_ready",
    "1 while the broker session is up and the database is writable (as /readyz).",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
CURRENT_LAG = Gauge(
    f"{PREFIX}_current_lag_seconds",
    "How far behind flespi the mirror is now: now minus flespi's time of the newest message "
    "committed (server.timestamp of device and channel messages, the timestamp property of the "
    "rest; retained snapshots left out). 0 until a message is committed; grows while nothing "
    "new arrives, so read it with flespi_mirror_stalled_seconds.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
STALLED = Gauge(
    f"{PREFIX}_stalled_seconds",
    "Seconds without a commit while messages wait to be written (0 while batches commit, or "
    "nothing waits). Past --stall-after, /readyz answers 503 'stalled'.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
LAST_COMMIT = Gauge(
    f"{PREFIX}_last_commit_timestamp_seconds",
    "Unix time of the last committed batch.",
    registry=REGISTRY,
    multiprocess_mode="max",
)
MAINTENANCE_ERRORS = Counter(
    f"{PREFIX}_partition_maintenance_errors_total",
    "Failed runs of history partition maintenance (retried every maintenance interval).",
    registry=REGISTRY,
)
COMPACTED = Counter(
    f"{PREFIX}_compacted_messages_total",
    "Messages moved from a history table's recent tier into its packed hours, by table.",
    ["table"],
    registry=REGISTRY,
)
COMPACTION_ERRORS = Counter(
    f"{PREFIX}_compaction_errors_total",
    "Failed compaction steps (nothing moved; retried on the next pass).",
    registry=REGISTRY,
)
COMPACTION_BACKLOG = Gauge(
    f"{PREFIX}_compaction_backlog_seconds",
    "How far compaction is behind: the age of the oldest message that is due to be packed, "
    "beyond --compact-after (0 when caught up).",
    registry=REGISTRY,
    multiprocess_mode="max",
)
RECOUNTED_DAYS = Counter(
    f"{PREFIX}_device_day_recounts_total",
    "Device days whose distance and moving time were computed again from their track, after "
    "messages arrived out of order.",
    registry=REGISTRY,
)
RECOUNT_ERRORS = Counter(
    f"{PREFIX}_recount_errors_total",
    "Failed recounts of device days (retried a few seconds later).",
    registry=REGISTRY,
)
DATABASE_ERROR_KINDS = ("unavailable", "held", "refused")
DATABASE_ERRORS = Counter(
    f"{PREFIX}_database_errors_total",
    "Failed batch writes: unavailable = the database could not be reached or was busy, retried; "
    "held = the database refused the batch for a reason of its environment (privilege, missing "
    "object, trigger, constraint), held and retried; refused = rows whose own content was "
    "refused, dead-lettered.",
    ["kind"],
    registry=REGISTRY,
)
BATCH_HELD = Gauge(
    f"{PREFIX}_batch_held",
    "1 while a batch is held because the database refuses it for a reason of its environment "
    "(see /readyz for the error); nothing is acknowledged meanwhile.",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
SET_ASIDE = Gauge(
    f"{PREFIX}_set_aside_records",
    "Records that ran out of time when written alone, waiting in the side queue (retried with "
    "backoff, their messages unacknowledged) while the rest of the stream commits. Above 0, "
    "/readyz answers 503 'set aside: ...'.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
SET_ASIDE_TOTAL = Counter(
    f"{PREFIX}_set_aside_total",
    "Records set aside after timing out alone, by outcome: set_aside (entered the side queue), "
    "written (a retry committed it).",
    ["outcome"],
    registry=REGISTRY,
)
GAPS_DETECTED = Counter(
    f"{PREFIX}_gaps_detected_total",
    "Reconnects after which the broker may have dropped messages (a session it did not keep, "
    "or a disconnect that ended a hold of --stall-after seconds or more, or named an "
    "overloaded broker): each puts a window in the REST repair.",
    registry=REGISTRY,
)

REST_REQUESTS = Counter(
    f"{PREFIX}_rest_requests_total",
    "REST-over-MQTT calls to flespi by outcome: ok, retried (an attempt failed and was retried), "
    "error (flespi answered an error), timeout (no complete answer on any attempt).",
    ["outcome"],
    registry=REGISTRY,
)
REST_DURATION = Histogram(
    f"{PREFIX}_rest_request_duration_seconds",
    "Time from publishing a REST-over-MQTT request to its last answer chunk.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
REST_IN_FLIGHT = Gauge(
    f"{PREFIX}_rest_requests_in_flight",
    "REST-over-MQTT requests published and not yet answered.",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
BACKFILL_MESSAGES = Counter(
    f"{PREFIX}_backfill_messages_total",
    "History fetched from flespi's storage to fill a gap, by outcome: fetched (received over "
    "REST), written (handed to the store: new rows), already_stored (the mirror had it).",
    ["outcome"],
    registry=REGISTRY,
)
BACKFILL_PENDING = Gauge(
    f"{PREFIX}_backfill_pending_devices",
    "Devices (and calculator-device pairs) whose gap is not backfilled yet in the running "
    "backfill (0 when none runs).",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
RECONCILE_DELETIONS = Counter(
    f"{PREFIX}_reconcile_deletions_total",
    "Rows the reconcile deleted (with a tombstone) because flespi no longer lists them, by table.",
    ["table"],
    registry=REGISTRY,
)


# Labelled series start at 0, so rate() and increase() see the first event too.
for _reason in Reason:
    DEAD_LETTERS.labels(str(_reason))
for _kind in DATABASE_ERROR_KINDS:
    DATABASE_ERRORS.labels(_kind)
for _outcome in ("ok", "retried", "error", "timeout"):
    REST_REQUESTS.labels(_outcome)
for _outcome in ("fetched", "written", "already_stored"):
    BACKFILL_MESSAGES.labels(_outcome)
for _table in ("telemetry", "device_settings", "plugin_device_configs", "objects"):
    RECONCILE_DELETIONS.labels(_table)


@dataclass
class Health:
    """What /healthz and /readyz answer from."""

    mqtt_connected: bool = False
    subscribed: bool = False
    database_ok: bool = False
    stopping: bool = False
    started: float = field(default_factory=time.time)
    # Why the last write failed, while the database is not ok ("" when unknown).
    database_problem: str = ""
    batch_held: bool = False
    # Why the mirror is stuck though nothing failed ("" while it progresses): see --stall-after.
    stalled: str = ""
    # Records waiting in the side queue after timing out alone ("" when none): pipeline.py.
    set_aside: str = ""

    @property
    def ready(self) -> bool:
        return (
            self.mqtt_connected
            and self.database_ok
            and not self.stopping
            and not self.stalled
            and not self.set_aside
        )

    def not_ready_reasons(self) -> list[str]:
        database = "batch held" if self.batch_held else "database unavailable"
        if self.database_problem:
            database += f" ({self.database_problem})"
        checks = (
            ("mqtt disconnected", self.mqtt_connected),
            (database, self.database_ok),
            ("stopping", not self.stopping),
            (self.stalled, not self.stalled),
            (self.set_aside, not self.set_aside),
        )
        return [name for name, ok in checks if not ok]

    def update(self, **changes: bool) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        MQTT_CONNECTED.set(1 if self.mqtt_connected else 0)
        READY.set(1 if self.ready else 0)

    def database_failed(self, problem: str, *, held: bool) -> None:
        """A write failed for the reason given; readiness says so until it succeeds."""
        self.database_problem = problem
        self.batch_held = held
        BATCH_HELD.set(1 if held else 0)
        self.update(database_ok=False)

    def database_recovered(self) -> None:
        self.database_problem = ""
        self.batch_held = False
        BATCH_HELD.set(0)
        self.update(database_ok=True)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """``histogram.observe`` of each amount, counted per bucket first: one update of each bucket
    touched instead of two locked updates per amount (a batch of 5,000 messages observes its
    lags at once). Falls back to ``observe`` if prometheus_client's internals change."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    if not amounts:
        return
    counts = collections.Counter(map(partial(bisect_left, bounds), amounts))
    total.inc(sum(amounts))
    for index, count in counts.items():
        buckets[index].inc(count)


class Readiness(Protocol):
    @property
    def ready(self) -> bool: ...

    def not_ready_reasons(self) -> list[str]: ...


@dataclass(frozen=True)
class Response:
    status: str
    content_type: str
    body: bytes


def respond(
    path: str, accept: str, health: Readiness, registry: CollectorRegistry = REGISTRY
) -> Response:
    """The answer to ``GET path``: only /metrics, /healthz and /readyz exist."""
    if path == "/metrics":
        encoder, content_type = choose_encoder(accept)
        return Response("200 OK", content_type, encoder(registry))
    if path == "/healthz":
        return Response("200 OK", "text/plain", b"ok\n")
    if path == "/readyz":
        if health.ready:
            return Response("200 OK", "text/plain", b"ready\n")
        reasons = ", ".join(health.not_ready_reasons())
        return Response("503 Service Unavailable", "text/plain", f"not ready: {reasons}\n".encode())
    return Response("404 Not Found", "text/plain", b"not found\n")


class MetricsServer:
    """The HTTP listener: one thread running an asyncio server, whatever the number of clients.

    A thread of its own, so a busy daemon loop never delays a scrape or a probe; asyncio inside
    it, so 1,000 idle connections cost 1,000 sockets, not 1,000 threads, and a probe is still
    answered among them. A client gets ``request_timeout`` seconds to send its request and take
    the answer, then the connection is closed. prometheus-client's own servers start a thread
    per request, hence this small server.
    """

    MAX_REQUEST_BYTES = 8192
    BACKLOG = 1024  # connections the kernel queues before the loop accepts them

    def __init__(
        self,
        host: str,
        port: int,
        health: Readiness,
        registry: CollectorRegistry = REGISTRY,
        *,
        request_timeout: float = 5.0,
    ) -> None:
        self.health = health
        self.registry = registry
        self.request_timeout = request_timeout
        self.clients = 0  # connections open now
        # Bound here, so a port in use fails the caller at once.
        self._socket = socket.create_server((host, port), backlog=self.BACKLOG)
        self.port = int(self._socket.getsockname()[1])
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="metrics-http", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(
                self._serve, sock=self._socket, limit=self.MAX_REQUEST_BYTES, backlog=self.BACKLOG
            )
        )
        self._loop.run_forever()
        self._server.close()
        clients = asyncio.all_tasks(self._loop)
        for task in clients:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*clients, return_exceptions=True))
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._socket.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), self.request_timeout)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError):
            pass  # a slow, silent or broken client: drop it
        finally:
            self.clients -= 1
            writer.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.wait_closed(), self.request_timeout)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers = dict(
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in header_lines if line)
        )
        if method not in ("GET", "HEAD"):
            answer = Response("405 Method Not Allowed", "text/plain", b"method not allowed\n")
        else:
            path = target.split("?", 1)[0]
            answer = respond(path, headers.get("accept", ""), self.health, self.registry)
        writer.write(
            f"HTTP/1.1 {answer.status}\r\nContent-Type: {answer.content_type}\r\n"
            f"Content-Length: {len(answer.body)}\r\nConnection: close\r\n\r\n".encode()
        )
        if method == "GET":
            writer.write(answer.body)
        await writer.drain()
