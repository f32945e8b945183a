"""Secrets stay secret and TLS is verified: the token never shows in logs, metrics, exceptions,
repr or the process title; mqtts:// checks certificates (--ca-file for a private CA).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.ops.config import ConfigError, Secret, Settings
from mirror.store.database import create_engine
from tests.helpers import (
    ROOT,
    daemon_process,
    eventually,
    http_get,
    publisher,
    stop_process,
    wait_for_log,
)
from tests.launchers import (
    ConfiguredMosquittoBroker,
    MosquittoBroker,
    TestCertificates,
    TlsMosquittoBroker,
    free_port,
    make_test_certificates,
    record_figures,
)


def process_title(pid: int) -> str:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    ps = subprocess.run(
        ["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, check=False
    ).stdout
    comm = Path(f"/proc/{pid}/comm").read_text()
    return "\n".join([cmdline, ps, comm])


def with_password(url: str, password: str) -> str:
    """The same database URL with a password (trust auth ignores it; it must never leak)."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=password).render_as_string(hide_password=False)


def secret_daemon(
    broker_url: str, database_url: str, schema: str, token: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """`flespi-mirror run` with both secrets in the environment only."""
    return daemon_process(broker_url, database_url, schema, *extra, log_path=log, token=token)


# --------------------------------------------------------------------------------------------
# The token


def test_settings_repr_and_config_errors_never_show_the_token():
    token = "FlespiTokenRepr" + uuid.uuid4().hex
    password = "DbPw" + uuid.uuid4().hex
    settings = Settings(
        mqtt_url="mqtts://mqtt.flespi.io:8883",
        token=Secret(token),
        database_url=Secret(f"postgresql://u:{password}@db:5432/x"),
    )
    shown = repr(settings) + str(settings) + repr(settings.token) + f"{settings.token}"
    assert token not in shown and password not in shown
    assert token not in settings.effective_client_id()
    with pytest.raises(ConfigError) as refused:
        Settings(mqtt_url="mqtt://mqtt.flespi.io:1883", token=Secret(token))
    message = str(refused.value) + repr(refused.value)
    assert "clear text" in message and "--allow-plain-token" in message
    assert token not in message
    import traceback

    formatted = "".join(traceback.format_exception(refused.value))
    assert token not in formatted
    # Explicitly allowed, the same settings are accepted.
    allowed = Settings(
        mqtt_url="mqtt://mqtt.flespi.io:1883", token=Secret(token), allow_plain_token=True
    )
    assert token not in repr(allowed)


def test_cli_refuses_a_plain_text_token_to_a_flespi_host_without_printing_it(database):
    token = "FlespiTokenPlain" + uuid.uuid4().hex
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirror.cli",
            "run",
            "--mqtt-url",
            "mqtt://mqtt.flespi.io:1883",
            "--database-url",
            database.url,
        ],
        cwd=ROOT,
        env={**os.environ, "FLESPI_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "refusing to send the flespi token in clear text" in result.stderr
    assert token not in result.stdout + result.stderr


@pytest.fixture
def refusing_broker() -> Iterator[MosquittoBroker]:
    """A broker that refuses every client (no anonymous access, no password file)."""
    b = ConfiguredMosquittoBroker(extra_config=("allow_anonymous false",)).start()
    try:
        yield b
    finally:
        b.cleanup()


async def test_token_never_appears_in_logs_metrics_or_process_title(
    broker, refusing_broker, database, schema_name, tmp_path
):
    token = "FlespiTokenLeak" + uuid.uuid4().hex
    password = "DbPwLeak" + uuid.uuid4().hex
    db_url = with_password(database.url, password)
    log = tmp_path / "daemon.log"
    seen: list[str] = []

    # 1. A broker that refuses the connection: failed CONNACKs, retries, debug logging.
    port = free_port()
    proc = secret_daemon(
        refusing_broker.url,
        db_url,
        schema_name,
        token,
        log,
        "--log-level",
        "debug",
        "--metrics-port",
        str(port),
    )
    try:
        await asyncio.to_thread(wait_for_log, log, "reconnecting to", 2, 30)
        seen.append(process_title(proc.pid))
        for path in ("/metrics", "/readyz", "/healthz"):
            seen.append((await asyncio.to_thread(http_get, port, path))[1])
        assert "not ready" in seen[-2]
    finally:
        assert stop_process(proc) == 0
    refused_log = log.read_text(errors="replace")

    # 2. A broker that accepts: connect, mirror, lose the broker, reconnect, stop.
    port = free_port()
    proc = secret_daemon(
        broker.url,
        db_url,
        schema_name,
        token,
        log,
        "--log-level",
        "debug",
        "--metrics-port",
        str(port),
    )
    engine = create_engine(database.url, schema_name)
    try:
        await asyncio.to_thread(wait_for_log, log, "subscribed to", 1, 30)
        with publisher(broker.url) as pub:
            pub.publish("flespi/state/gw/devices/1/telemetry/x", 1, 1_731_990_000.0)
            pub.publish("flespi/bogus", b"\xff", 1_731_990_000.0)  # a dead letter too
        await eventually(engine, "SELECT count(*) FROM telemetry", [(1,)])
        broker.kill()
        await asyncio.to_thread(wait_for_log, log, "reconnecting to", 4, 30)
        broker.start()
        await asyncio.to_thread(wait_for_log, log, "subscribed to", 2, 30)
        seen.append(process_title(proc.pid))
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        for path in ("/metrics", "/readyz", "/healthz"):
            seen.append((await asyncio.to_thread(http_get, port, path))[1])
    finally:
        await engine.dispose()
        assert stop_process(proc) == 0
    text = log.read_text(errors="replace")
    seen.append(text)
    everything = "\n".join(seen)
    assert "Not authorized" in refused_log or "not authorised" in refused_log.lower(), refused_log[
        -2000:
    ]
    assert token.encode() in environ  # where it was given, and only there
    leaks = [
        where
        for where, chunk in zip(
            [
                "refused: title",
                "refused: /metrics",
                "refused: /readyz",
                "refused: /healthz",
                "live: title",
                "live: /metrics",
                "live: /readyz",
                "live: /healthz",
                "log",
            ],
            seen,
            strict=True,
        )
        if token in chunk or password in chunk
    ]
    assert not leaks, f"a secret leaked into: {leaks}"
    assert token[:16] not in everything and password[:12] not in everything
    record_figures(
        "token_secrecy",
        {
            "log_bytes_scanned": len(text),
            "places_checked": len(seen),
            "leaks": 0,
        },
    )


# --------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> TestCertificates:
    return make_test_certificates(tmp_path_factory.mktemp("tls"), hostnames=("localhost",))


@pytest.fixture
def tls_broker(certificates) -> Iterator[TlsMosquittoBroker]:
    plain = free_port()
    b = TlsMosquittoBroker(certificates=certificates, extra_config=(f"listener {plain} 127.0.0.1",))
    b.plain_port = plain  # type: ignore[attr-defined]  # for the test's own publisher
    b.start()
    try:
        yield b
    finally:
        b.cleanup()


async def test_tls_with_the_private_ca_connects_and_mirrors(
    tls_broker, certificates, database, schema_name, tmp_path
):
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    proc = daemon_process(
        tls_broker.url,
        database.url,
        schema_name,
        "--ca-file",
        str(certificates.ca_file),
        env={"FLESPI_TOKEN": "tls-test-token"},
        log_path=log,
    )
    engine = create_engine(database.url, schema_name)
    try:
        await asyncio.to_thread(wait_for_log, log, "subscribed to", 1, 30)
        connected_in = time.monotonic() - started
        assert f"connected to mqtts://localhost:{tls_broker.port}" in log.read_text()
        with publisher(f"mqtt://127.0.0.1:{tls_broker.plain_port}") as pub:
            pub.publish("flespi/state/gw/devices/1/telemetry/tls", "ok", 1_731_990_000.0)
        await eventually(engine, "SELECT value #>> '{}' FROM telemetry", [("ok",)])
    finally:
        await engine.dispose()
        assert stop_process(proc) == 0
    record_figures("tls_private_ca", {"connected_and_subscribed_s": round(connected_in, 2)})


@pytest.mark.parametrize(
    ("case", "host", "use_ca"),
    [
        ("no --ca-file (system CAs do not know the private CA)", "localhost", False),
        ("certificate for another host name", "127.0.0.1", True),
    ],
)
async def test_tls_refuses_a_certificate_it_cannot_verify(
    tls_broker, certificates, database, schema_name, tmp_path, case, host, use_ca
):
    log = tmp_path / "daemon.log"
    port = free_port()
    extra = ["--metrics-port", str(port)]
    if use_ca:
        extra += ["--ca-file", str(certificates.ca_file)]
    proc = daemon_process(
        f"mqtts://{host}:{tls_broker.port}",
        database.url,
        schema_name,
        *extra,
        env={"FLESPI_TOKEN": "tls-test-token"},
        log_path=log,
    )
    try:
        await asyncio.to_thread(wait_for_log, log, "reconnecting to", 2, 30)
        status, body = await asyncio.to_thread(http_get, port, "/readyz")
        text = log.read_text(errors="replace")
        assert status == 503 and "mqtt disconnected" in body, (case, status, body)
        assert "certificate verify failed" in text.lower() or "CERTIFICATE_VERIFY_FAILED" in text, (
            case,
            text[-2000:],
        )
        assert "connected to mqtts://" not in text and "subscribed to" not in text, case
    finally:
        assert stop_process(proc) == 0
