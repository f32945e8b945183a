"""A daemon that cannot start says why in one line, names the setting, and exits non-zero.

Only a database that cannot be reached is waited for; one that answers "no" stops the daemon.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy.engine import make_url

from tests.helpers import ROOT, daemon_process, stop_process, wait_for_log
from tests.launchers import _run_admin, free_port


def start(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mirror.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line saying why the daemon stopped (start-up lines before it are fine)."""
    assert "Traceback" not in result.stderr, result.stderr
    fatal = [line for line in result.stderr.splitlines() if "critical" in line.lower()]
    assert len(fatal) == 1, result.stderr
    return fatal[0]


def other_database(url: str, name: str, **changes: str) -> str:
    return make_url(url).set(database=name, **changes).render_as_string(hide_password=False)


def test_a_missing_database_is_one_line_naming_the_setting(database, broker):
    missing = other_database(database.url, f"nope_{uuid.uuid4().hex[:8]}")
    result = start("run", "--mqtt-url", broker.url, "--database-url", missing)
    assert result.returncode == 2
    line = one_line(result)
    assert "does not exist" in line and "--database-url / MIRROR_DATABASE_URL" in line


def test_a_missing_database_is_one_json_object_with_log_format_json(database, broker):
    missing = other_database(database.url, f"nope_{uuid.uuid4().hex[:8]}")
    result = start(
        "migrate", "--log-format", "json", "--database-url", missing, "--schema", "flespi"
    )
    assert result.returncode == 2
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    entry = json.loads(one_line(result))
    assert entries[-1] == entry
    assert entry["level"] == "critical" and "does not exist" in entry["message"]


def test_permission_denied_while_migrating_stops_with_what_to_do(database, schema_name):
    role = f"ops_{uuid.uuid4().hex[:8]}"
    _run_admin(database.url, f"CREATE ROLE {role} LOGIN")
    try:
        result = start(
            "migrate", "--schema", schema_name, "--database-url",
            other_database(database.url, database.name, username=role),
        )  # fmt: skip
    finally:
        _run_admin(database.url, f"DROP ROLE {role}")
    assert result.returncode == 2
    line = one_line(result)
    assert "permission denied" in line and "flespi-mirror migrate" in line


def test_a_metrics_port_in_use_names_the_port(database, broker, schema_name):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start(
            "run", "--mqtt-url", broker.url, "--database-url", database.url, "--schema",
            schema_name, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
        )  # fmt: skip
    assert result.returncode == 2
    line = one_line(result)
    assert f"127.0.0.1:{port}" in line and "--metrics-port / MIRROR_METRICS_PORT" in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mirror:hunter2@db.example:notaport/fleet",
        "mysql://mirror:hunter2@db.example/fleet",
        "postgresql://mirror:x@db.example/fleet?password=hunter2&sslmod=require",
    ],
)
def test_an_unusable_database_url_is_one_line_without_its_password(url):
    result = start("migrate", "--database-url", url)
    assert result.returncode == 2
    line = one_line(result)
    assert "--database-url / MIRROR_DATABASE_URL" in line and "hunter2" not in line


def test_an_unreachable_database_is_waited_for(broker, schema_name, tmp_path):
    log = tmp_path / "daemon.log"
    away = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = daemon_process(broker.url, away, schema_name, log_path=log)
    try:
        wait_for_log(log, "retrying in", count=2)
        assert proc.poll() is None, "the daemon gave up on a database that is only away"
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0


def test_user_info_in_the_broker_url_is_refused_without_showing_it():
    start_time = time.monotonic()
    result = start(
        "run", "--mqtt-url", "mqtt://user:hunter2@127.0.0.1:1883",
        "--database-url", "postgresql://x@127.0.0.1:1/x",
    )  # fmt: skip
    assert result.returncode == 2 and time.monotonic() - start_time < 30
    line = one_line(result)
    assert "user info in the broker URL is not used" in line and "hunter2" not in line


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://mirror:hunter2@127.0.0.1:5432/fleet?sslmode=bogus",
        "postgresql://mirror:hunter2@db.example:notaport/fleet",
        "mysql://mirror:hunter2@db.example/fleet",
        "postgresql://mirror:x@db.example/fleet?password=hunter2&sslmod=require",
    ],
)
def test_an_unusable_database_url_is_a_configuration_error_before_the_banner(url):
    """`run` checks the URL before it logs what it starts: the one line is the error, with the
    prefix every configuration error has."""
    result = start("run", "--mqtt-url", "mqtt://127.0.0.1:1", "--database-url", url)
    assert result.returncode == 2
    line = one_line(result)
    assert result.stderr.strip().splitlines() == [line], "more than the error was logged"
    assert "configuration error: --database-url / MIRROR_DATABASE_URL: " in line
    assert "hunter2" not in line


def test_a_bad_sslmode_names_the_modes_that_work(database):
    url = make_url(database.url).update_query_dict({"sslmode": "verify_full"})
    result = start("migrate", "--database-url", url.render_as_string(hide_password=False))
    assert result.returncode == 2
    line = one_line(result)
    prefix = "configuration error: --database-url / MIRROR_DATABASE_URL: "
    assert f"{prefix}sslmode='verify_full'" in line
    assert "disable, allow, prefer, require, verify-ca, verify-full" in line


def test_a_url_asyncpg_refuses_is_a_configuration_error_too():
    """A URL parameter asyncpg refuses at connect time (not checked before) keeps the prefix."""
    from mirror.ops.failures import describe

    class ClientConfigurationError(Exception):  # asyncpg's, by name
        pass

    fatal = describe(ClientConfigurationError("`target_session_attrs` is invalid"))
    assert fatal is not None and fatal.exit_code == 2
    assert fatal.message.startswith("configuration error: --database-url / MIRROR_DATABASE_URL: ")


def test_a_refused_broker_connection_names_the_url_and_what_to_check(
    database, schema_name, tmp_path
):
    log = tmp_path / "daemon.log"
    nobody = f"mqtt://127.0.0.1:{free_port()}"
    proc = daemon_process(nobody, database.url, schema_name, log_path=log)
    try:
        wait_for_log(log, "and that the broker is running", timeout=60)
    finally:
        assert stop_process(proc, signal.SIGTERM) == 0
    line = next(x for x in log.read_text().splitlines() if "the broker is running" in x)
    assert f"cannot connect to the broker at {nobody} (" in line
    assert "check the host and port in --mqtt-url / MIRROR_MQTT_URL" in line
