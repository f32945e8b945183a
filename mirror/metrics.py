"""Every metric the mirror exports, defined once, plus the HTTP listener that serves them.

Label values come from bounded sets only (topic family, table, operation, reason, QoS): never a
device id or a topic. The listener serves ``/metrics``, ``/healthz`` and ``/readyz`` and nothing
else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from mirror import __version__
from mirror.records import (
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
    "End-to-end lag: commit time minus the message's MQTT 'timestamp' user property.",
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

    @property
    def ready(self) -> bool:
        return self.mqtt_connected and self.database_ok and not self.stopping

    def not_ready_reasons(self) -> list[str]:
        database = "batch held" if self.batch_held else "database unavailable"
        if self.database_problem:
            database += f" ({self.database_problem})"
        checks = (
            ("mqtt disconnected", self.mqtt_connected),
            (database, self.database_ok),
            ("stopping", not self.stopping),
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Readiness(Protocol):
    @property
    def ready(self) -> bool: ...

    def not_ready_reasons(self) -> list[str]: ...


def health_app(
    health: Readiness, registry: CollectorRegistry = REGISTRY
) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if health.ready:
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready\n"]
            reasons = health.not_ready_reasons()
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [("not ready: " + ", ".join(reasons) + "\n").encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app


class MetricsServer:
    """The HTTP listener, in a daemon thread so a busy event loop never delays a scrape."""

    def __init__(
        self, host: str, port: int, health: Readiness, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self._server = make_server(
            host,
            port,
            health_app(health, registry),
            ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
